"""The image commands of the ``blockfs`` CLI: ``create``, ``snapshot`` and ``info``.

Each works on an image file directly (never on a mounted image) and raises UsageError /
ImageError for a user's mistake; ``blockfs.cli.main`` prints those as one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node
from blockfs.values import parse_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser(
        "create",
        help="create a qcow2, vhdx or raw image",
        description="Create an image. Options (-o, comma separated): for qcow2 cluster_size, "
        "compat (0.10 or 1.1), preallocation (off, metadata), backing_file, backing_fmt; for "
        "vhdx block_size (1M to 256M), subformat (dynamic, fixed), log_size, "
        "logical_sector_size and physical_sector_size (512, 4096), backing_file (the parent of "
        "a differencing image), backing_fmt.",
        epilog="examples:\n"
        "  blockfs create -f qcow2 disk.qcow2 20G\n"
        "  blockfs create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2      # an overlay\n"
        "  blockfs create -p -f qcow2 -o preallocation=metadata,cluster_size=2M big.qcow2 1T\n"
        "  blockfs create -f vhdx -o subformat=fixed,block_size=32M disk.vhdx 8G\n"
        "  blockfs create -f raw disk.img 4G\n"
        "  blockfs create -f qcow2 ssh://alice@host/srv/disk.qcow2 10G  # remote: ssh, gluster\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "-f", dest="fmt", default="qcow2", help="image format: qcow2 (default), vhdx, raw"
    )
    c.add_argument(
        "-b",
        dest="backing",
        metavar="BACKING",
        help="backing file (qcow2), or parent (vhdx: a differencing image)",
    )
    c.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the backing file")
    c.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="format options, KEY=VALUE,... (above); may repeat",
    )
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c.add_argument(
        "-p",
        dest="progress",
        action="store_true",
        help="show progress (the long part: preallocation=metadata, subformat=fixed)",
    )
    c.add_argument("filename", help="the new image (a path, ssh:// or gluster://)")
    c.add_argument("size", nargs="?", help="virtual size (K, M, G, T suffixes)")
    c.set_defaults(func=cmd_create)

    s = subparsers.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots",
        description="Internal snapshots of a qcow2 image (qemu-img snapshot's options). On an "
        "image a blockfs mount serves (the image file, or MNT/NAME), the operation goes through "
        "MNT/.control/images/NAME/snapshots and is done live. --external adds a new image over "
        "a mounted image's active layer.",
        epilog="examples:\n"
        "  blockfs snapshot -c before-upgrade disk.qcow2\n"
        "  blockfs snapshot -l disk.qcow2\n"
        "  blockfs snapshot -a before-upgrade /mnt/vm/disk0      # live, through the mount\n"
        "  blockfs snapshot -d before-upgrade disk.qcow2\n"
        "  blockfs snapshot --external disk0-snap1.qcow2 /mnt/vm/disk0\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot")
    g.add_argument("-l", dest="list", action="store_true", help="list snapshots")
    g.add_argument("-a", dest="apply", metavar="NAME", help="revert to a snapshot")
    g.add_argument("-d", dest="delete", metavar="NAME", help="delete a snapshot")
    g.add_argument(
        "--external",
        metavar="NEW",
        help="live external snapshot of MNT/NAME, an image a mount serves: NEW (a relative "
        "name is in the image's folder) becomes its active layer, over the old one",
    )
    s.add_argument(
        "-f", dest="format", choices=("qcow2", "vhdx"), help="format of NEW (--external)"
    )
    s.add_argument("filename", help="the image (or MNT/NAME)")
    s.set_defaults(func=cmd_snapshot)


# -- create -----------------------------------------------------------------------------------

#: the -o options of each format that takes any
_CREATE_OPTIONS = {
    "qcow2": ("cluster_size", "compat", "preallocation", "backing_file", "backing_fmt"),
    "vhdx": (
        "block_size",
        "subformat",
        "log_size",
        "logical_sector_size",
        "physical_sector_size",
        "backing_file",
        "backing_fmt",
    ),
}


def _parse_options(items: list[str], fmt: str) -> dict[str, str]:
    known = _CREATE_OPTIONS.get(fmt, _CREATE_OPTIONS["qcow2"])
    opts: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep:
                raise UsageError(f"option {part!r} needs a value (KEY=VALUE)")
            if key not in known:
                raise UsageError(f"unknown option {key!r} (known: {', '.join(known)})")
            opts[key] = value.strip()
    return opts


def cmd_create(args: argparse.Namespace) -> int:
    """``blockfs create``; with ``-p``, progress on stderr once the writer first reports."""
    from contextlib import ExitStack

    with ExitStack() as bars:
        on_progress: Callable[[int, int], None] | None = None
        if args.progress:
            from blockfs.cli.progress import progress

            update: Callable[[int], None] | None = None

            def on_progress(done: int, total: int) -> None:
                nonlocal update
                if update is None:  # the total is known once the image is laid out
                    update = bars.enter_context(progress(f"Creating {args.filename}", total))
                update(done)

        return _create(args, on_progress)


def _create(args: argparse.Namespace, on_progress: Callable[[int, int], None] | None) -> int:
    from blockfs.nodes.qcow2 import create_qcow2, create_raw

    opts = _parse_options(args.options, args.fmt)
    backing = args.backing or opts.pop("backing_file", None)
    backing_fmt = args.backing_fmt or opts.pop("backing_fmt", None)
    size = parse_size(args.size, "image size") if args.size is not None else None
    if args.fmt == "raw":
        if backing or opts:
            raise UsageError("raw images take no backing file and no options")
        if size is None:
            raise UsageError("image size is required")
        raw_size = size

        async def write_raw(target: Node) -> None:
            await create_raw(target, raw_size)

        trio.run(create_image_file, args.filename, args.force, write_raw)
        return 0
    if args.fmt == "vhdx":
        trio.run(
            create_image_file,
            args.filename,
            args.force,
            _vhdx_writer(opts, size, backing, backing_fmt, on_progress),
        )
        return 0
    if args.fmt != "qcow2":
        raise UsageError(f"cannot create format {args.fmt!r} (qcow2, vhdx, raw)")
    cluster_size = parse_size(opts.pop("cluster_size", "65536"), "cluster size")

    async def write_qcow2(target: Node) -> None:
        await create_qcow2(
            target,
            size,
            cluster_size=cluster_size,
            compat=opts.pop("compat", "1.1"),
            backing=backing,
            backing_fmt=backing_fmt,
            preallocation=opts.pop("preallocation", "off"),
            on_progress=on_progress,
        )

    trio.run(create_image_file, args.filename, args.force, write_qcow2)
    return 0


def _vhdx_writer(
    opts: dict[str, str],
    size: int | None,
    parent: str | None,
    parent_fmt: str | None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Callable[[Node], Awaitable[None]]:
    """What ``create -f vhdx`` writes. Sizes are parsed here, before any file is made; the
    rest is checked by ``create_vhdx`` before its first write."""
    from blockfs.nodes.vhdx import create_vhdx

    def size_opt(key: str) -> int | None:
        value = opts.get(key)
        return parse_size(value, key.replace("_", " ")) if value is not None else None

    block_size = size_opt("block_size")
    log_size = size_opt("log_size")
    lss = size_opt("logical_sector_size")
    pss = size_opt("physical_sector_size")
    subformat = opts.get("subformat", "dynamic")

    async def write(target: Node) -> None:
        await create_vhdx(
            target,
            size,
            block_size=block_size,
            subformat=subformat,
            log_size=log_size,
            logical_sector_size=lss,
            physical_sector_size=pss,
            parent=parent,
            parent_fmt=parent_fmt,
            on_progress=on_progress,
        )

    return write


async def create_image_file(
    path: str, overwrite: bool, write: Callable[[Node], Awaitable[None]]
) -> None:
    """Open a file node for a new image at ``path`` and let ``write`` make the image in it.

    The file is made with O_EXCL; with ``overwrite`` an existing regular file is used instead
    (``write`` truncates it, once the file is known not to be in use). Anything but a regular
    file is refused, and a FIFO never hangs the open. When ``write`` fails, a file made here,
    or an existing one it had begun to change, is removed.

    :raise UsageError: the file exists (without ``overwrite``), is not a regular file, is in
        use; whatever ``write`` raises.
    """
    from blockfs.nodes.file import FileNode
    from blockfs.nodes.protocols import scheme_of

    if scheme_of(path) not in (None, "file"):
        await _create_remote(path, overwrite, write)
        return
    base = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # --force on a FIFO: no hang
    created = True
    try:
        try:
            fd = os.open(path, base | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not overwrite:
                raise UsageError(
                    f"{path}: file exists (use --force to overwrite)", errno=errno.EEXIST
                ) from None
            created = False
            fd = os.open(path, base)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UsageError(f"{path}: not a regular file")
        target = FileNode.from_fd(fd, path)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)
        raise
    try:
        await write(target)
    except BaseException:
        after = os.fstat(target.fd)
        if created or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            os.unlink(path)
        raise
    finally:
        await target.aclose()


async def _create_remote(
    location: str, overwrite: bool, write: Callable[[Node], Awaitable[None]]
) -> None:
    """:func:`create_image_file` for a remote location: the file is made exclusively by the
    protocol (``--force`` removes an existing one first) and removed if ``write`` fails."""
    from blockfs.nodes.protocols import protocol_for

    driver = protocol_for(location)
    if overwrite:
        try:
            await driver.remove(location)
        except BlockfsError as exc:
            if exc.errno != errno.ENOENT:
                raise
    target = await driver.create(location)
    try:
        await write(target)
    except BaseException:
        with trio.CancelScope(shield=True):
            await target.aclose()
            await driver.remove(location)
        raise
    await target.flush()
    await target.aclose()


# -- snapshot ---------------------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.external is not None:
        return _external_snapshot(args)
    if args.format is not None:
        raise UsageError("-f is for --external snapshots")
    ctl = serving_control_file(args.filename, "snapshots")
    if ctl is not None:
        return _snapshot_through(ctl, args)
    from blockfs.nodes.qcow2 import Qcow2Node, apply_snapshot, create_snapshot, delete_snapshot
    from blockfs.nodes.registry import close_chain, open_image

    async def run() -> None:
        node = await open_image(args.filename, read_only=bool(args.list))
        try:
            if not isinstance(node, Qcow2Node):
                raise UsageError(f"{args.filename}: internal snapshots need a qcow2 image")
            if args.list:
                print(format_snapshots(node.describe()["snapshots"]), end="")  # type: ignore[arg-type]
            elif args.create is not None:
                await create_snapshot(node, args.create)
            elif args.apply is not None:
                await apply_snapshot(node, args.apply)
            else:
                await delete_snapshot(node, args.delete)
        finally:
            await close_chain(node)

    trio.run(run)
    return 0


def _snapshot_through(ctl: str, args: argparse.Namespace) -> int:
    """``snapshot -l/-c/-d/-a`` on an image a mount serves: through its ``snapshots`` file,
    live, instead of failing on the mount's lock."""
    from blockfs.cli.jobs import write_control

    if args.list:
        with open(ctl, encoding="utf-8") as f:
            print(format_snapshots(json.load(f)), end="")
        return 0
    verb, tag = (
        ("create", args.create) if args.create is not None
        else ("apply", args.apply) if args.apply is not None
        else ("delete", args.delete)
    )  # fmt: skip
    write_control(ctl, f"{verb} {tag}")
    return 0


def blockfs_mounts() -> list[str]:
    """The mountpoints of the blockfs mounts this user made (``/proc/self/mountinfo``).

    Only mounts whose ``user_id=`` is ours: the kernel sets it to the uid of whoever mounted
    (fusermount3 for a user), so another user cannot pass a file system of their own, typed
    ``fuse.blockfs``, for one of ours and answer our snapshot commands with its own files.
    """
    from blockfs.daemon import unescape_mountinfo

    mine = f"user_id={os.getuid()}"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                tail = right.split()  # fstype, source, super options
                if (
                    sep
                    and len(fields) > 4
                    and len(tail) > 2
                    and tail[0] == "fuse.blockfs"
                    and mine in tail[2].split(",")
                ):
                    found.append(unescape_mountinfo(fields[4]))
    except OSError:
        pass
    return found


def serving_control_file(filename: str, leaf: str) -> str | None:
    """``MNT/.control/images/NAME/<leaf>`` of the mount that serves ``filename``, which is
    either the mounted file ``MNT/NAME`` or the image file a mount has open (as its active
    layer: the ``filename`` its info file shows is the same file); None when no mount this
    user can ask serves it."""
    path = os.path.realpath(filename)  # mountinfo names mountpoints without symlinks
    mnt, name = os.path.split(path)
    mounts = blockfs_mounts()
    # MNT/NAME only where MNT is one of our mounts: a folder that merely holds a .control
    # tree (another user's, a FIFO in it) is never written to
    if mnt in mounts:
        direct = os.path.join(mnt, ".control", "images", name, leaf)
        return direct if os.path.exists(direct) else None
    try:
        st = os.stat(path)
    except OSError:
        return None
    for mountpoint in mounts:
        images = os.path.join(mountpoint, ".control", "images")
        try:
            names = os.listdir(images)
        except OSError:
            continue
        for n in names:
            try:
                with open(os.path.join(images, n, "info"), encoding="utf-8") as f:
                    shown = json.load(f).get("filename")
                other = os.stat(shown)
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # not ours to read (another user's mount), a remote image, ...
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return os.path.join(images, n, leaf)
    return None


def _external_snapshot(args: argparse.Namespace) -> int:
    """Through ``MNT/.control/images/NAME/ctl`` of the mount that serves ``filename``."""
    from blockfs.cli.jobs import write_control

    ctl = serving_control_file(args.filename, "ctl")
    if ctl is None:
        raise UsageError(
            f"{args.filename} is not an image a blockfs mount of yours serves (MNT/NAME); "
            "--external snapshots are taken of mounted images",
            errno=errno.ENOENT,
        )
    spec = f"snapshot={shlex.quote(args.external)}"
    if args.format:
        spec += f" format={args.format}"
    print(write_control(ctl, spec))
    return 0


def format_snapshots(snapshots: list[dict[str, Any]]) -> str:
    """The snapshot table as ``qemu-img snapshot -l`` (7.2) prints it."""
    if not snapshots:
        return ""
    lines = [f"{'ID':<9} {'TAG':<16} {'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        ms = s["vm-clock-nsec"] // 1_000_000
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        icount = str(s["icount"]) if "icount" in s else ""
        size = human_size(s["vm-state-size"])
        lines.append(f"{s['id']:<9} {s['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}")
    return "Snapshot list:\n" + "\n".join(lines) + "\n"


def human_size(n: int) -> str:
    """A size as qemu-img prints one: three significant digits and a binary unit."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20),
                        ("KiB", 10)):  # fmt: skip
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} B"
