"""The ``blockfs`` command: mount, umount, and the image and job commands.

The one place that talks to a person: every BlockfsError becomes ``blockfs: <one line>`` on
stderr and exit status 1; argparse mistakes exit 2. No traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import sys
import time

from blockfs import __version__
from blockfs.cli import check, images, inspect, jobs
from blockfs.config import FUSE_THREADS, MAX_FUSE_THREADS, ImageSpec
from blockfs.errors import BlockfsError, UsageError
from blockfs.imagespec import parse_image_specs

log = logging.getLogger("blockfs")

#: how long ``blockfs mount`` waits for the daemon to open its images and mount
STARTUP_TIMEOUT = 300.0
#: how long ``blockfs umount`` waits for the daemon to flush, close and exit
SHUTDOWN_TIMEOUT = 300.0


def _setup_logging(log_file: str | None, foreground: bool, verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s")
    if log_file:
        h: logging.Handler = logging.FileHandler(log_file)
        h.setFormatter(fmt)
        root.addHandler(h)
    if os.path.exists("/dev/log"):
        try:
            sh = logging.handlers.SysLogHandler(address="/dev/log")
            sh.setFormatter(logging.Formatter("blockfs[%(process)d]: %(levelname)s %(message)s"))
            sh.setLevel(logging.WARNING if not verbose else logging.INFO)
            root.addHandler(sh)
        except OSError:
            pass
    if foreground:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h.setLevel(logging.DEBUG if verbose else logging.WARNING)
        root.addHandler(h)


# -- mount ------------------------------------------------------------------------------------


def _cmd_mount(args: argparse.Namespace) -> int:
    from blockfs.daemon import check_mountpoint, mount_state
    from blockfs.nodes.file import check_image_file
    from blockfs.nodes.protocols import scheme_of

    specs = parse_image_specs(args.images)
    for spec in specs:
        if scheme_of(spec.path) not in (None, "file"):
            continue  # a remote image is checked when the daemon opens it
        try:
            check_image_file(spec.path)
        except BlockfsError as exc:
            raise type(exc)(f"image {spec.name}: {exc}", errno=exc.errno) from None
    if args.log:
        try:
            fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UsageError(f"log file {args.log}: not a regular file")
            finally:
                os.close(fd)
        except OSError as exc:
            raise UsageError(f"log file {args.log}: {exc.strerror}") from None
    if not args.foreground:
        if mount_state(args.mountpoint) != "stale":
            check_mountpoint(args.mountpoint)  # fail fast, before a daemon is started
        return _spawn_daemon(args)
    return _run_daemon(args, specs)


def _run_daemon(args: argparse.Namespace, specs: list[ImageSpec]) -> int:
    import trio

    from blockfs.config import MountConfig
    from blockfs.daemon import Daemon

    _setup_logging(args.log, foreground=args.ready_fd is None, verbose=args.verbose)
    config = MountConfig(
        mountpoint=args.mountpoint,
        images=specs,
        read_only=args.read_only,
        allow_other=args.allow_other,
        image_uid=args.uid,
        image_gid=args.gid,
        image_mode=args.mode,
        fsname=args.fsname,
        fuse_threads=args.fuse_threads,
    )
    ready_fd: int | None = args.ready_fd

    def ready(message: str | None, warnings: list[str]) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            for w in warnings if message is None else ():
                print(f"blockfs: warning: {w}", file=sys.stderr)
            return
        lines = [f"warning {' '.join(w.split())}\n" for w in warnings]
        lines.append("ok\n" if message is None else f"error {message}\n")
        try:
            os.write(ready_fd, "".join(lines).encode())
        finally:
            os.close(ready_fd)
            ready_fd = None

    try:
        trio.run(Daemon(config).run, ready)
    except BlockfsError:
        raise
    except KeyboardInterrupt:
        return 130
    return 0


def _spawn_daemon(args: argparse.Namespace) -> int:
    r, w = os.pipe()
    # -P: the working folder is not put on the import path, so a folder that happens to hold
    # something named blockfs cannot stand in for the installed package.
    cmd = [sys.executable, "-P", "-m", "blockfs", "mount", "--foreground", f"--ready-fd={w}"]
    if args.read_only:
        cmd.append("--read-only")
    if args.allow_other:
        cmd.append("--allow-other")
    if args.mode is not None:
        cmd.append(f"--mode={args.mode:o}")
    if args.uid is not None:
        cmd.append(f"--uid={args.uid}")
    if args.gid is not None:
        cmd.append(f"--gid={args.gid}")
    if args.verbose:
        cmd.append("--verbose")
    if args.log:
        cmd += ["--log", os.path.abspath(args.log)]
    if args.fsname != "blockfs":
        cmd.append(f"--fsname={args.fsname}")
    if args.fuse_threads is not None:
        cmd.append(f"--fuse-threads={args.fuse_threads}")
    cmd += [os.path.abspath(args.mountpoint), "--", *args.images]
    with open(os.devnull, "rb+") as devnull:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(w,),
            stdin=devnull,
            stdout=devnull,
            stderr=devnull,
            start_new_session=True,
            close_fds=True,
        )
    os.close(w)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    answer = b""
    import select

    def finished(text: bytes) -> bool:
        last = text.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return text.endswith(b"\n") and (last == b"ok" or last.startswith(b"error "))

    try:
        while not finished(answer):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(proc.pid, signal.SIGTERM)
                raise BlockfsError(f"the daemon did not mount within {STARTUP_TIMEOUT:.0f} s")
            chunk = os.read(r, 4096)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(r)
    lines = answer.decode(errors="replace").strip().splitlines() or [""]
    text = lines[-1]
    if text == "ok":
        # Warnings only with success: a refused mount says one line, its reason.
        for line in lines[:-1]:
            if line.startswith("warning "):
                print(f"blockfs: warning: {line[len('warning ') :]}", file=sys.stderr)
        return 0
    if text.startswith("error "):
        proc.wait()
        raise BlockfsError(text[len("error ") :])
    code = proc.wait()
    where = f"; see {args.log}" if args.log else "; see the system log"
    raise BlockfsError(f"the daemon exited during start-up (status {code}){where}")


# -- umount -----------------------------------------------------------------------------------


def _daemon_pid(mountpoint: str) -> int | None:
    try:
        with open(os.path.join(mountpoint, ".control", "pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"blockfs" not in f.read():
                return None
    except OSError:
        return None
    return pid


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie of ours (in tests the daemon may be our child) counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return False


def _cmd_umount(args: argparse.Namespace) -> int:
    from blockfs.daemon import detach_stale, mount_state

    mnt = os.path.abspath(args.mountpoint)
    state = mount_state(mnt)
    if state == "stale":
        detach_stale(mnt)
        if mount_state(mnt) == "stale":
            raise BlockfsError(f"{mnt}: could not detach the dead mount")
        return 0
    if state in ("missing", "notdir"):
        raise UsageError(f"{mnt}: no such directory", errno=errno.ENOENT)
    if state != "mounted":
        raise UsageError(f"{mnt}: not mounted")
    pid = _daemon_pid(mnt)
    if pid is None:
        raise UsageError(f"{mnt}: not a blockfs mount")
    # A plain (not lazy) unmount: refused while a file is open, like umount(8). The daemon then
    # sees its FUSE channel close, flushes and closes every image, and exits.
    res = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "fusermount3 failed"
        if "busy" in msg.lower():
            raise BlockfsError(f"{mnt}: busy (a file under it is open)", errno=errno.EBUSY)
        raise BlockfsError(f"{mnt}: {msg}")
    if not _wait_gone(pid, SHUTDOWN_TIMEOUT):
        raise BlockfsError(f"daemon {pid} did not exit within {SHUTDOWN_TIMEOUT:.0f} s")
    return 0


# -- the parser -------------------------------------------------------------------------------


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: permission bits only (0 to 0777)")
    return mode


def id_number(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= n < 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return n


def _fuse_threads(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number, nor auto") from None
    if not 0 <= n <= MAX_FUSE_THREADS:
        raise argparse.ArgumentTypeError(f"{text!r}: 0 to {MAX_FUSE_THREADS}")
    return n


TOP_EPILOG = """\
examples:
  blockfs mount /mnt/disks disk0=/srv/a.qcow2,format=qcow2 disk1=/srv/b.img
  blockfs umount /mnt/disks
  blockfs COMMAND --help       every option of COMMAND, with examples

mount(8) and /etc/fstab: `mount -t fuse.blockfs IMAGE MNT -o OPTIONS` runs mount.fuse.blockfs
(see mount.fuse.blockfs --help, examples/fstab and examples/blockfs-disk.mount).
"""

MOUNT_EPILOG = """\
IMAGE keys (comma separated after the path; ",," is a comma inside the path):
  format=F            raw, qcow2 or vhdx; without it the format is probed (and a warning given)
  read-only=on        open this image read-only
  backing-dirs=A:B    folders a probed image may take its backing files from
  inject=on           an error-injection filter under the image (for tests)
  ssh://... and gluster://... images take their own keys (host=, user=, identity=, server=, ...)

examples:
  blockfs mount /mnt/disks disk0=/srv/a.qcow2,format=qcow2 disk1=/srv/b.img,format=raw
  blockfs mount --read-only --allow-other --uid=1000 --gid=1000 --mode=640 /mnt/ro /srv/a.img
  blockfs mount --log=/var/log/blockfs.log /mnt/vm vm=ssh://alice@host/srv/vm.qcow2,format=qcow2
  blockfs mount -f -v /mnt/debug disk0=/srv/a.img     # serve in the foreground, log to stderr
  blockfs mount --fuse-threads=0 /mnt/disks /srv/a.img   # pyfuse3's loop, no reader threads
"""

UMOUNT_EPILOG = """\
examples:
  blockfs umount /mnt/disks
  umount /mnt/disks        the same, through umount.fuse.blockfs (when installed)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockfs",
        description="Virtual disk images as plain files, with live block jobs.",
        epilog=TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"blockfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser(
        "mount",
        help="mount images as files under MNT",
        description="Mount images as files under MNT; returns once every image is open and\n"
        "the mount is up (the daemon serves it in the background).",
        epilog=MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("mountpoint", metavar="MNT", help="an empty directory to mount on")
    m.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="NAME=PATH[,key=value...] or PATH (below); NAME is the file's name under MNT",
    )
    m.add_argument("--read-only", action="store_true", help="open every image read-only")
    m.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    m.add_argument(
        "--mode",
        type=octal_mode,
        metavar="OCTAL",
        help="permission bits of every image file (default: its image file's)",
    )
    m.add_argument(
        "--uid", type=id_number, help="owner of every image file (default: its image file's)"
    )
    m.add_argument(
        "--gid", type=id_number, help="group of every image file (default: its image file's)"
    )
    m.add_argument("-f", "--foreground", action="store_true", help="serve in this process")
    m.add_argument("--log", metavar="FILE", help="append the daemon's log to FILE")
    m.add_argument("-v", "--verbose", action="store_true", help="log every step (debug)")
    m.add_argument(
        "--fsname",
        default="blockfs",
        metavar="SOURCE",
        help="the source /proc/mounts shows (default blockfs; mount.fuse.blockfs passes its own)",
    )
    m.add_argument(
        "--fuse-threads",
        type=_fuse_threads,
        default=None,
        metavar="N",
        help="threads reading FUSE requests, which answer reads and writes of local raw, qcow2 "
        "and VHDX images themselves and send those of raw images on ssh hosts; auto (the "
        f"default): {FUSE_THREADS} when some image is local, 1 when all such are on ssh "
        "hosts, else 0 (0: pyfuse3's own loop, one task per request)",
    )
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=_cmd_mount)

    u = sub.add_parser(
        "umount",
        help="flush every image and unmount MNT",
        description="Unmount MNT: the daemon flushes and closes every image, and this returns\n"
        "once it has exited. Refused while a file under MNT is open. A mount whose daemon\n"
        "died (kill -9) is detached.",
        epilog=UMOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("mountpoint", metavar="MNT", help="a blockfs mountpoint")
    u.set_defaults(func=_cmd_umount)

    images.register(sub)
    inspect.register(sub)
    check.register(sub)
    jobs.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BlockfsError as exc:
        print(f"blockfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
