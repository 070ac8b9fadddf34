"""The mount(8) and umount(8) helpers: ``mount -t fuse.blockfs`` and ``/etc/fstab`` lines.

For a type ``fuse.blockfs`` util-linux runs ``/sbin/mount.fuse.blockfs SOURCE MNT [-sfnv]
[-o OPTIONS]`` and, at unmount, ``/sbin/umount.fuse.blockfs MNT [-flnrv]`` (it searches only
``/sbin:/sbin/fs.d:/sbin/fs``; ``mount.fuse``'s fallback would run the program ``blockfs`` with
those arguments, which is not its syntax, so the helpers must be installed under their own
names). Both are console scripts of this module; what lives here is the translation of mount's
words into a ``blockfs mount`` / ``blockfs umount`` call, and nothing of the mount itself.

Why an unmount helper: a FUSE unmount returns as soon as the kernel lets go, while the daemon
still flushes and closes its images; ``umount.fuse.blockfs`` runs ``blockfs umount``, which waits
for the daemon to exit, so an image is whole and unlocked when ``umount`` returns. umount(8) runs
it only for a mount listed in libmount's utab (for the others it takes the type from statfs(2),
a bare "fuse"), so the mount helper lists each mount there (``x-blockfs.umount``).

Exit codes are mount(8)'s: 1 for a mistake in the call (an unknown option, no image), 32 for a
mount that failed (a missing image file or mountpoint, an image refused), 8 for an interrupt.
Every refusal is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import grp
import os
import pwd
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

from blockfs import __version__
from blockfs.cli.main import build_parser, id_number, octal_mode
from blockfs.errors import BlockfsError, UsageError
from blockfs.imagespec import parse_image_specs

MOUNT_PROG = "mount.fuse.blockfs"
UMOUNT_PROG = "umount.fuse.blockfs"
FS_TYPE = "fuse.blockfs"


class Exit(enum.IntEnum):
    """mount(8) and umount(8): RETURN CODES."""

    OK = 0
    USAGE = 1
    INTERRUPTED = 8
    FAILED = 32


class MountFlag(enum.IntFlag):
    """The mount(2) flags of ``<linux/mount.h>`` the helper sets by a bind remount."""

    RDONLY = 0x1
    NOSUID = 0x2
    NODEV = 0x4
    NOEXEC = 0x8
    REMOUNT = 0x20
    NOATIME = 0x400
    NODIRATIME = 0x800
    BIND = 0x1000
    STRICTATIME = 0x1000000


NO_FLAGS = MountFlag(0)

#: source words that name no image (the images are all in ``image=`` options)
NO_SOURCE = frozenset({"", "none", "blockfs"})

#: per-mount flags blockfs does not set itself, each honoured by a bind remount after the mount
FLAG_OPTIONS = {
    "noexec": MountFlag.NOEXEC,
    "noatime": MountFlag.NOATIME,
    "nodiratime": MountFlag.NODIRATIME,
    "strictatime": MountFlag.STRICTATIME,
}

#: options already true of every blockfs mount (FUSE mounts nosuid,nodev; relatime is the
#: kernel's default; blockfs always asks the kernel to check permissions), or acted on by mount(8)
#: and systemd before the helper runs (auto, user, _netdev, nofail, ...)
NO_OP_OPTIONS = (
    "defaults", "async", "exec", "nosuid", "nodev", "atime", "diratime", "relatime",
    "default_permissions", "auto", "noauto", "user", "nouser", "users", "owner", "group",
    "_netdev", "nofail", "loud", "silent",
)  # fmt: skip
#: prefixes of options for other programs: userspace ``x-*`` and ``comment=`` (mount(8) drops
#: them before a helper, but a direct call may carry them), ``user=NAME`` of a user mount
NO_OP_PREFIXES = ("x-", "comment=", "user=")

#: options a blockfs mount cannot honour, with the reason given to the user
REFUSED_OPTIONS = {
    "suid": "blockfs mounts are always nosuid",
    "dev": "blockfs mounts are always nodev",
    "sync": "writes are not synchronous; fsync(2) or O_SYNC on a file makes them durable",
    "dirsync": "blockfs has no directories to write",
    "mand": "mandatory locks are not supported",
    "allow_root": "only allow_other is supported",
}


@dataclass(frozen=True)
class MountRequest:
    """One mount as mount(8) asked for it, in ``blockfs mount``'s terms."""

    mountpoint: str
    #: image specs as ``blockfs mount`` takes them (``NAME=PATH[,key=value...]`` or ``PATH``)
    images: tuple[str, ...] = ()
    read_only: bool = False
    allow_other: bool = False
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    log: str | None = None
    #: per-mount flags set after the mount (``noexec``, ``noatime``, ...)
    flags: MountFlag = NO_FLAGS
    #: the source as mount(8) got it: the mount shows it (``--fsname``), so that a second
    #: ``mount -a`` finds the fstab line mounted already
    source: str = "blockfs"

    def blockfs_args(self) -> list[str]:
        """The arguments of ``blockfs mount`` that make this mount."""
        args = []
        if self.read_only:
            args.append("--read-only")
        if self.allow_other:
            args.append("--allow-other")
        if self.uid is not None:
            args.append(f"--uid={self.uid}")
        if self.gid is not None:
            args.append(f"--gid={self.gid}")
        if self.mode is not None:
            args.append(f"--mode={self.mode:o}")
        if self.log is not None:
            args.append(f"--log={self.log}")
        if self.source != "blockfs":
            args.append(f"--fsname={self.source}")
        return [*args, self.mountpoint, "--", *self.images]


def split_options(text: str) -> list[str]:
    """Split a mount option string at the commas outside double quotes, as libmount does
    (mount(8) quotes ``context="a,b"`` so); the quotes are dropped and empty items skipped.

    :raise UsageError: a double quote is left open.
    """
    items: list[str] = []
    item: list[str] = []
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            items.append("".join(item))
            item = []
        else:
            item.append(c)
    if quoted:
        raise UsageError(f"options {text!r}: a double quote is not closed")
    items.append("".join(item))
    return [i for i in items if i]


def _account(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        try:
            if key == "uid":
                return pwd.getpwnam(value).pw_uid
            return grp.getgrnam(value).gr_gid
        except KeyError:
            what = "user" if key == "uid" else "group"
            raise UsageError(f"{key}={value}: no such {what}") from None
    try:
        return id_number(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{key}={exc}") from None


def _mode(value: str) -> int:
    try:
        return octal_mode(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"mode={exc}") from None


def translate(
    source: str, mountpoint: str, options: Sequence[str], *, sloppy: bool = False
) -> MountRequest:
    """Turn mount(8)'s ``SOURCE MNT -o OPTIONS`` (options already split) into a request.

    A later option overrides an earlier one (``rw,ro`` is read-only), as with mount(8);
    ``image=`` adds an image each time. ``sloppy`` (``mount -s``) skips unknown and refused
    options instead of failing. The image specs are checked here, nothing is opened.

    :raise UsageError: an unknown or refused option, a bad value or image spec, no image.
    """
    req = MountRequest(mountpoint=mountpoint, source=source.strip() or "blockfs")
    images = [] if source.strip() in NO_SOURCE else [source]
    for opt in options:
        key, sep, value = opt.partition("=")
        if opt in ("ro", "rw"):
            req = replace(req, read_only=opt == "ro")
        elif opt == "allow_other":
            req = replace(req, allow_other=True)
        elif opt in FLAG_OPTIONS:
            req = replace(req, flags=req.flags | FLAG_OPTIONS[opt])
        elif opt in NO_OP_OPTIONS or opt.startswith(NO_OP_PREFIXES):
            pass
        elif sep and key == "image":
            if not value:
                raise UsageError("image=: no image spec")
            images.append(value)
        elif sep and key == "uid":
            req = replace(req, uid=_account(key, value))
        elif sep and key == "gid":
            req = replace(req, gid=_account(key, value))
        elif sep and key == "mode":
            req = replace(req, mode=_mode(value))
        elif sep and key == "log":
            if not value:
                raise UsageError("log=: no file name")
            req = replace(req, log=value)
        elif sloppy:
            pass
        elif opt in REFUSED_OPTIONS:
            raise UsageError(f"option {opt!r} is not supported: {REFUSED_OPTIONS[opt]}")
        else:
            raise UsageError(f"unknown option {opt!r} (see {MOUNT_PROG} --help)")
    if not images:
        raise UsageError(
            f"no image: give one as the source or as image=NAME=PATH (see {MOUNT_PROG} --help)"
        )
    parse_image_specs(images)
    return replace(req, images=tuple(images))


# -- mount.fuse.blockfs -----------------------------------------------------------------------

MOUNT_DESCRIPTION = """\
The mount(8) helper of blockfs: `mount -t fuse.blockfs SOURCE MNT -o OPTIONS` and /etc/fstab
lines of type fuse.blockfs run it. It runs `blockfs mount` and returns once the mount is up.
"""

MOUNT_EPILOG = """\
SOURCE is an image (NAME=PATH[,format=F,...] or PATH, as `blockfs mount` takes it), or `none`
(or `blockfs`) when every image is an image= option.

options (-o, comma separated; a later one overrides an earlier one):
  image=SPEC        one more image, NAME=PATH[,format=F,read-only=on,...] (repeatable); a SPEC
                    holding commas is put in double quotes: image="d1=/srv/b.img,format=raw"
                    (a comma inside the path itself is doubled, as in `blockfs mount`:
                    image="d1=/srv/a,,b.img"); a double quote cannot be part of a value
  ro, rw            open every image read-only (--read-only), or not (the default)
  allow_other       let other users see the mount (--allow-other)
  uid=ID, gid=ID    owner and group of every image file, a number or a name (--uid, --gid)
  mode=OCTAL        permission bits of every image file (--mode)
  log=FILE          append the daemon's log to FILE (--log); otherwise warnings go to syslog
{flags}
                    set on the mount once it is up (a bind remount)
{ignored}
{refused}

In /etc/fstab, a space is written \\040 (mount(8) decodes it before the helper sees it).

exit status (mount(8)'s): 0 mounted, 1 a mistake in the call (unknown option, no image),
  32 the mount failed (image or mountpoint missing, image refused), 8 interrupted

examples:
  mount -t fuse.blockfs /srv/vm/disk0.qcow2 /mnt/disk -o ro,allow_other
  mount -t fuse.blockfs none /mnt/disks \\
        -o 'image=d0=/srv/a.img,image="d1=/srv/b.qcow2,format=qcow2",uid=1000,mode=600'
  # /etc/fstab:
  disk0=/srv/vm/disk0.qcow2,format=qcow2  /mnt/disk  fuse.blockfs  allow_other,nofail  0 0
  umount /mnt/disk     # runs umount.fuse.blockfs: returns once every image is flushed

A mount made without -n is listed in /run/mount/utab (option x-blockfs.umount): that is what
makes umount(8) run umount.fuse.blockfs; a mount made with -n is unmounted without waiting.

install: mount(8) looks in /sbin only, so both helpers are linked there, e.g.
  ln -s $VENV/bin/mount.fuse.blockfs /sbin/mount.fuse.blockfs
  ln -s $VENV/bin/umount.fuse.blockfs /sbin/umount.fuse.blockfs
"""


def _listing(title: str, words: Sequence[str]) -> str:
    return textwrap.fill(
        f"{title}: {', '.join(words)}", width=96, initial_indent="  ", subsequent_indent="    "
    )


MOUNT_EPILOG = MOUNT_EPILOG.format(
    flags=f"  {', '.join(FLAG_OPTIONS)}",
    ignored=_listing(
        "ignored (true of every blockfs mount, or mount(8)'s and systemd's business)",
        [*NO_OP_OPTIONS, *(f"{p}*" for p in NO_OP_PREFIXES)],
    ),
    refused=_listing(
        "refused (unless -s)", [*(f"{k} ({why})" for k, why in REFUSED_OPTIONS.items()), "others"]
    ),
)

UMOUNT_DESCRIPTION = """\
The umount(8) helper of blockfs: `umount MNT` of a fuse.blockfs mount runs it. It runs
`blockfs umount MNT`, which returns once the daemon has flushed and closed every image.
"""

UMOUNT_EPILOG = """\
exit status (umount(8)'s): 0 unmounted, 1 a mistake in the call, 32 the unmount failed (busy,
  not a blockfs mount)

examples:
  umount /mnt/disk         # flushes every image, then returns
  umount -l /mnt/disk      # detaches now; the daemon flushes once the last file is closed
"""


class _HelperParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one line and mount(8)'s exit code 1."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _mount_parser() -> argparse.ArgumentParser:
    p = _HelperParser(
        prog=MOUNT_PROG,
        description=MOUNT_DESCRIPTION,
        epilog=MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="an image, or none")
    p.add_argument("mountpoint", metavar="MNT", help="the directory to mount on")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated options (below); may be given again",
    )
    p.add_argument("-s", dest="sloppy", action="store_true", help="skip unknown options")
    p.add_argument("-f", dest="fake", action="store_true", help="check everything, mount nothing")
    p.add_argument("-n", dest="no_mtab", action="store_true", help="ignored (there is no mtab)")
    p.add_argument("-v", dest="verbose", action="store_true", help="show the blockfs command")
    p.add_argument("-N", dest="namespace", metavar="NS", help="refused (no namespaces)")
    p.add_argument("-t", dest="type", metavar="TYPE", help=f"{FS_TYPE} (given by mount(8))")
    p.add_argument("--version", action="version", version=f"{MOUNT_PROG} (blockfs) {__version__}")
    return p


def _check_type(fs_type: str | None) -> None:
    if fs_type is not None and fs_type not in (FS_TYPE, "blockfs"):
        raise UsageError(f"type {fs_type!r}: this helper mounts {FS_TYPE} only")


def _say(prog: str, message: object) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def _run_blockfs(argv: list[str]) -> None:
    """Run one ``blockfs`` command in this process.

    :raise BlockfsError: the command failed (its message is one line).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed why; the arguments were checked before
        raise UsageError(f"blockfs {shlex.join(argv)}: refused") from None
    code = args.func(args)
    if code:
        raise BlockfsError(f"blockfs {argv[0]} exited with status {code}")


def _set_mount_flags(req: MountRequest) -> None:
    """Add ``req.flags`` to the mount's own flags (a bind remount, which leaves the file
    system alone and sets the per-mount flags: those blockfs has are given again).

    :raise BlockfsError: the kernel refused.
    """
    flags = MountFlag.REMOUNT | MountFlag.BIND | MountFlag.NOSUID | MountFlag.NODEV | req.flags
    if req.read_only:
        flags |= MountFlag.RDONLY
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(os.path.abspath(req.mountpoint))
    if libc.mount(None, target, None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        names = ",".join(k for k, f in FLAG_OPTIONS.items() if f in req.flags)
        raise BlockfsError(f"{req.mountpoint}: cannot set {names}: {os.strerror(err)}", errno=err)


#: the userspace option that gives every blockfs mount an entry in libmount's utab (below)
UTAB_MARK = "x-blockfs.umount"
#: options mount(8) passes on that libmount also keeps in utab (x-* ones never reach a helper)
UTAB_OPTIONS = ("_netdev",)


def _libmount() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libmount.so.1", use_errno=True)
    except OSError:
        return None
    lib.mnt_new_fs.restype = ctypes.c_void_p
    lib.mnt_new_update.restype = ctypes.c_void_p
    for name in ("mnt_fs_set_source", "mnt_fs_set_target", "mnt_fs_set_options"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.mnt_update_set_fs.argtypes = [
        ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_void_p
    ]  # fmt: skip
    lib.mnt_update_table.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mnt_free_update.argtypes = [ctypes.c_void_p]
    lib.mnt_unref_fs.argtypes = [ctypes.c_void_p]
    return lib


def _record_in_utab(source: str, mountpoint: str, options: Sequence[str]) -> None:
    """Give the mount an entry in libmount's utab (/run/mount/utab), through libmount.

    Why: umount(8) reads an unlisted target's type from statfs(2), a bare "fuse", and unmounts
    it itself, returning while the daemon still flushes; for a listed one it reads mountinfo,
    sees fuse.blockfs and runs umount.fuse.blockfs, which waits. mount(8) adds no entry of its
    own when its helper has made one for the same source and target, and umount(8) removes it.

    :raise BlockfsError: libmount refused (the mount is up all the same).
    """
    lib = _libmount()
    if lib is None:
        raise BlockfsError("libmount.so.1 is not installed")
    fs = lib.mnt_new_fs()
    upd = lib.mnt_new_update()
    try:
        lib.mnt_fs_set_source(fs, os.fsencode(source))
        lib.mnt_fs_set_target(fs, os.fsencode(mountpoint))
        lib.mnt_fs_set_options(fs, ",".join([*options, UTAB_MARK]).encode())
        rc = lib.mnt_update_set_fs(upd, 0, None, fs)
        if rc == 0:
            rc = lib.mnt_update_table(upd, None)
    finally:
        lib.mnt_free_update(upd)
        lib.mnt_unref_fs(fs)
    if rc < 0:
        raise BlockfsError(f"cannot record {mountpoint} in utab: {os.strerror(-rc)}", errno=-rc)


def mount_main(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.blockfs SOURCE MNT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]``."""
    try:
        call = _mount_parser().parse_args(argv)
        _check_type(call.type)
        if call.namespace is not None:
            raise UsageError("-N: mounting in another namespace is not supported")
        options = [o for text in call.options for o in split_options(text)]
        req = translate(call.source, call.mountpoint, options, sloppy=call.sloppy)
    except UsageError as exc:
        _say(MOUNT_PROG, exc)
        return Exit.USAGE
    argv_blockfs = ["mount", *req.blockfs_args()]
    if call.verbose:
        print(f"{MOUNT_PROG}: blockfs {shlex.join(argv_blockfs)}")
    if call.fake:
        return Exit.OK
    try:
        _run_blockfs(argv_blockfs)
        if req.flags:
            try:
                _set_mount_flags(req)
            except BlockfsError:
                with contextlib.suppress(BlockfsError):  # all that was asked for, or no mount
                    _run_blockfs(["umount", req.mountpoint])
                raise
    except BlockfsError as exc:
        _say(MOUNT_PROG, exc)
        return Exit.FAILED
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    if not call.no_mtab and os.geteuid() == 0:
        try:
            kept = [o for o in options if o in UTAB_OPTIONS]
            _record_in_utab(call.source, os.path.realpath(call.mountpoint), kept)
        except BlockfsError as exc:
            _say(MOUNT_PROG, f"warning: {exc}; umount will not wait for the flush")
    return Exit.OK


# -- umount.fuse.blockfs ----------------------------------------------------------------------


def _umount_parser() -> argparse.ArgumentParser:
    p = _HelperParser(
        prog=UMOUNT_PROG,
        description=UMOUNT_DESCRIPTION,
        epilog=UMOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint", metavar="MNT", help="the blockfs mountpoint")
    p.add_argument(
        "-l", dest="lazy", action="store_true", help="detach now (umount -i -l); no wait"
    )
    p.add_argument(
        "-f", dest="force", action="store_true", help="abort the FUSE connection (umount -i -f)"
    )
    p.add_argument("-n", dest="no_mtab", action="store_true", help="ignored (there is no mtab)")
    p.add_argument("-r", dest="remount_ro", action="store_true", help="ignored")
    p.add_argument("-v", dest="verbose", action="store_true", help="show what is run")
    p.add_argument("-N", dest="namespace", metavar="NS", help="refused (no namespaces)")
    p.add_argument("-t", dest="type", metavar="TYPE", help=f"{FS_TYPE} (given by umount(8))")
    p.add_argument("--version", action="version", version=f"{UMOUNT_PROG} (blockfs) {__version__}")
    return p


def umount_main(argv: Sequence[str] | None = None) -> int:
    """``umount.fuse.blockfs MNT [-flnrv] [-N NS] [-t TYPE]``."""
    try:
        call = _umount_parser().parse_args(argv)
        _check_type(call.type)
        if call.namespace is not None:
            raise UsageError("-N: unmounting in another namespace is not supported")
    except UsageError as exc:
        _say(UMOUNT_PROG, exc)
        return Exit.USAGE
    try:
        if call.lazy or call.force:
            # The kernel's own unmount (-i: no helper, not this one again); the daemon
            # flushes and exits by itself once the connection is gone.
            cmd = ["umount", "-i", *(["-l"] if call.lazy else []), *(["-f"] if call.force else [])]
            cmd.append(call.mountpoint)
            if call.verbose:
                print(f"{UMOUNT_PROG}: {shlex.join(cmd)}")
            return subprocess.run(cmd).returncode
        if call.verbose:
            print(f"{UMOUNT_PROG}: blockfs umount {shlex.quote(call.mountpoint)}")
        _run_blockfs(["umount", call.mountpoint])
    except BlockfsError as exc:
        _say(UMOUNT_PROG, exc)
        return Exit.FAILED
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return Exit.OK
