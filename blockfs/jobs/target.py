"""Job targets: files the daemon creates or opens because a spec named them.

The daemon usually runs as root, and the folder a spec names may be writable by other users.
Nothing a user does to that folder may make root write a file the user could not write:

- The folder is reached only through symbolic links owned by root or by the daemon's user, and
  is opened once (``O_DIRECTORY``); every later step is relative to that descriptor, and the
  descriptor is checked to be the folder that was checked (its path read back from ``/proc``).
- A folder writable by another user is refused unless it has the sticky bit (``/tmp``).
- ``mode=new``: the file is created under a hidden temporary name in the same folder with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and the source's permission bits (0600 when the source has
  none; never wider than the source), then written and used through that one descriptor: it is
  never opened again by name. It gets its final name only when the job succeeds, without
  replacing anything (``renameat2(RENAME_NOREPLACE)``), and is removed when the job fails or is
  cancelled; after a crash only the hidden ``.NAME.XXXXXXXX.part`` file remains, which no one
  takes for a finished copy.
- ``mode=existing``: the last component is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` and
  must be a regular file or a block device (a FIFO would hang the daemon); in a sticky folder it
  must belong to the daemon's user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from typing import Any

import trio

from blockfs.errors import BlockfsError, UsageError
from blockfs.jobs.job import ErrorAction
from blockfs.nodes.base import Node
from blockfs.nodes.file import FileNode, check_not_served
from blockfs.nodes.protocols import protocol_for, scheme_of
from blockfs.nodes.qcow2 import create_qcow2, create_raw
from blockfs.nodes.registry import OpenPolicy, close_chain, open_format, protocol_file
from blockfs.nodes.retry import RetryFilter
from blockfs.nodes.vhdx import create_vhdx
from blockfs.values import choice, job_id, parse_words, size_value

_RENAME_NOREPLACE = 1
_libc: Any = None


def _who(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _writable_by_others(st: os.stat_result) -> bool:
    mode = st.st_mode
    if mode & stat.S_IWOTH:
        return True
    if mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid()):
        return True
    return bool(mode & stat.S_IWUSR) and not _trusted_owner(st.st_uid)


def _check_links(path: str) -> None:
    """:raise UsageError: (EACCES) a symbolic link on the way to ``path`` belongs to a user
    who is neither root nor the daemon's user."""
    cur = "/"
    for part in path.strip("/").split("/"):
        if not part:
            continue
        nxt = os.path.join(cur, part)
        try:
            st = os.lstat(nxt)
        except OSError:
            return  # missing: the open below says so
        if stat.S_ISLNK(st.st_mode):
            if not _trusted_owner(st.st_uid):
                raise UsageError(
                    f"{nxt} is a symbolic link owned by {_who(st.st_uid)}; refused",
                    errno=errno.EACCES,
                )
            nxt = os.path.realpath(nxt)
        cur = nxt


class TargetFolder:
    """An open folder for job targets, checked as the module docstring says."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.sticky = False

    @classmethod
    def open(cls, path: str) -> TargetFolder:
        """:raise UsageError: missing, not a folder, a link of another user's on the way, or
        writable by others without the sticky bit."""
        path = os.path.abspath(path)
        _check_links(path)
        real = os.path.realpath(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"target folder {path} does not exist", errno=errno.ENOENT) from None
        except NotADirectoryError:
            raise UsageError(f"target folder {path} is not a folder", errno=errno.ENOTDIR) from None
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ELOOP:  # swapped for a link after realpath
                code = errno.EACCES
            raise UsageError(f"target folder {path}: {os.strerror(code)}", errno=code) from None
        folder = cls(fd, real)
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != real:
                raise UsageError(f"target folder {path} changed while it was opened; refused",
                                 errno=errno.EACCES)  # fmt: skip
            st = os.fstat(fd)
            check_not_served(st, path)
            folder.sticky = bool(st.st_mode & stat.S_ISVTX)
            if _writable_by_others(st) and not folder.sticky:
                raise UsageError(
                    f"target folder {path} is writable by other users (and not sticky); "
                    "refused: choose a folder only you can write",
                    errno=errno.EACCES,
                )
        except BaseException:
            folder.close()
            raise
        return folder

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


class TargetFile:
    """One target file of a job: an open descriptor, its folder and (mode=new) the temporary
    name it has until :meth:`publish`."""

    def __init__(
        self, folder: TargetFolder, name: str, fd: int, temp: str | None, created: bool
    ) -> None:
        self.folder = folder
        self.name = name
        self.fd = fd
        self.temp = temp
        #: this process made the file (so a job that fails to start removes it again)
        self.created = created
        st = os.fstat(fd)
        #: (st_dev, st_ino) of the file: the node may close ``fd`` before :meth:`publish`
        self.identity = (st.st_dev, st.st_ino)

    @property
    def path(self) -> str:
        """The final path (where the target is, or will be once the job succeeds)."""
        return os.path.join(self.folder.path, self.name)

    @property
    def partial_path(self) -> str | None:
        """Where an unfinished new target lies (None: it has its final name)."""
        return os.path.join(self.folder.path, self.temp) if self.temp else None

    @classmethod
    def create(cls, path: str, perm: int, *, temporary: bool = True) -> TargetFile:
        """Create a new empty file for ``path`` (under a hidden temporary name unless
        ``temporary`` is off). :raise UsageError: EEXIST, ENOENT, EACCES as fits."""
        folder, name = _split(path)
        try:
            if folder.exists(name):
                raise UsageError(
                    f"target {folder.path}/{name} exists already (use mode=existing)",
                    errno=errno.EEXIST,
                )
            temp = f".{name[:200]}.{secrets.token_hex(4)}.part" if temporary else None
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(temp or name, flags, perm & 0o666, dir_fd=folder.fd)
            except OSError as exc:
                code = exc.errno or errno.EIO
                what = "exists already" if code == errno.EEXIST else os.strerror(code)
                raise UsageError(f"target {folder.path}/{name}: {what}", errno=code) from None
            # The umask may have narrowed the bits; it must not be what widens them, and a
            # hostile umask cannot: fchmod sets exactly the source's bits.
            os.fchmod(fd, perm & 0o666)
        except BaseException:
            folder.close()
            raise
        return cls(folder, name, fd, temp, True)

    @classmethod
    def open_existing(cls, path: str) -> TargetFile:
        """Open an existing target for writing. :raise UsageError:"""
        folder, name = _split(path)
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.ELOOP, "is a symbolic link")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    raise OSError(errno.EINVAL, "not a regular file or block device")
                fd = os.open(name, flags, dir_fd=folder.fd)
            except FileNotFoundError:
                raise UsageError(
                    f"target {folder.path}/{name} does not exist (mode=existing)",
                    errno=errno.ENOENT,
                ) from None
            except OSError as exc:
                code = exc.errno or errno.EIO
                why = "is a symbolic link; refused" if code == errno.ELOOP else exc.strerror
                raise UsageError(f"target {folder.path}/{name}: {why}", errno=code) from None
            try:
                st = os.fstat(fd)
                check_not_served(st, f"target {folder.path}/{name}")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    raise UsageError(
                        f"target {folder.path}/{name}: not a regular file or block device",
                        errno=errno.EINVAL,
                    )
                if folder.sticky and st.st_uid != os.geteuid():
                    raise UsageError(
                        f"target {folder.path}/{name} belongs to {_who(st.st_uid)} in a "
                        "folder anyone may write; refused",
                        errno=errno.EACCES,
                    )
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            folder.close()
            raise
        return cls(folder, name, fd, None, False)

    async def publish(self) -> None:
        """Give a new target its final name, never replacing a file that took the name in
        the meantime. :raise UsageError: (EEXIST) the name is taken; the data stays under
        :attr:`partial_path`."""
        if self.temp is None:
            return
        try:
            # The entry must still be the file this process made (in a sticky folder no one
            # else can rename it, but a check costs two stats).
            there = os.stat(self.temp, dir_fd=self.folder.fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) != self.identity:
                raise OSError(errno.EPERM, "it was replaced while the job ran")
            _rename_noreplace(self.folder.fd, self.temp, self.name)
        except OSError as exc:
            raise UsageError(
                f"cannot name the target {self.path}: {exc.strerror}; the copy is in "
                f"{self.partial_path}",
                errno=exc.errno or errno.EIO,
            ) from None
        self.temp = None

    async def discard(self, *, even_named: bool = False) -> None:
        """Remove an unfinished new target (its descriptor is closed by its node); with
        ``even_named``, also one created under its final name (a job that never started)."""
        name = self.temp or (self.name if even_named and self.created else None)
        if name is not None:
            try:
                os.unlink(name, dir_fd=self.folder.fd)
            except FileNotFoundError:
                pass
            self.temp = None
            self.created = False

    def close(self) -> None:
        """Release the folder (the file's descriptor belongs to the node over it)."""
        self.folder.close()


class RemoteTargetFile:
    """A job's target on remote storage (an ``ssh://`` or ``gluster://`` location): made
    exclusively under a hidden temporary name beside its final one, given that name by a
    rename that never replaces a file (the protocol driver's ``rename``: SFTP's fails on an
    existing name, gluster's links then unlinks), or removed."""

    def __init__(self, path: str, temp: str | None, created: bool) -> None:
        self.path = path
        #: the temporary location until :meth:`publish` (None: it has its final name)
        self.temp = temp
        self.created = created

    @property
    def partial_path(self) -> str | None:
        return self.temp

    @classmethod
    async def make(
        cls, path: str, *, mode: str, temporary: bool
    ) -> tuple[RemoteTargetFile, Node]:
        """The file (made, or opened with mode=existing) and its protocol node, under the
        protocol's retry filter. :raise UsageError: EEXIST, ENOENT, EACCES as fits."""
        driver = protocol_for(path)
        if mode == "new":
            if await driver.exists(path):
                raise UsageError(
                    f"target {path} exists already (use mode=existing)", errno=errno.EEXIST
                )
            temp = driver.resolve(path, f".{_base_name(path)[:200]}.{secrets.token_hex(4)}.part")
            where = temp if temporary else path
            node = await driver.create(where)
            tfile = cls(path, temp if temporary else None, True)
        else:
            node = await driver.open(path, read_only=False)
            tfile = cls(path, None, False)
        retry = driver.retry_for(path)
        return tfile, RetryFilter(node, retry) if retry is not None else node

    async def publish(self) -> None:
        """:raise UsageError: (EEXIST) the name was taken; the data stay in the temporary
        file."""
        if self.temp is None:
            return
        try:
            await protocol_for(self.path).rename(self.temp, self.path)
        except BlockfsError as exc:
            raise UsageError(
                f"cannot name the target {self.path}: {exc}; the copy is in {self.temp}",
                errno=errno.EEXIST if exc.errno in (errno.EIO, errno.EEXIST) else exc.errno,
            ) from None
        self.temp = None

    async def discard(self, *, even_named: bool = False) -> None:
        where = self.temp or (self.path if even_named and self.created else None)
        if where is not None:
            with trio.CancelScope(shield=True):
                try:
                    await protocol_for(self.path).remove(where)
                except BlockfsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
            self.temp = None
            self.created = False

    def close(self) -> None:
        """Nothing held: the node over the file owns its remote handle."""


def _base_name(location: str) -> str:
    return location.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _split(path: str) -> tuple[TargetFolder, str]:
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise UsageError(f"target {path} names no file")
    return TargetFolder.open(parent), name


def _rename_noreplace(dir_fd: int, old: str, new: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc, without find_library's ldconfig run
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        res = fn(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), _RENAME_NOREPLACE)
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
    # No renameat2 here: a hard link fails on an existing name just as well.
    os.link(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(old, dir_fd=dir_fd)


#: the spec keys every job that copies a disk to a target takes (backup, mirror)
TARGET_JOB_KEYS = (
    "device",
    "target",
    "format",
    "mode",
    "sync",
    "speed",
    "on-source-error",
    "on-target-error",
    "id",
)
_ACTIONS = [a.value for a in ErrorAction]


def parse_target_job(
    text: bytes | str, extra_keys: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a spec of a job that copies a disk to a target: the common fields (a dict of
    the dataclass fields ``device``, ``target``, ``format``, ``mode``, ``sync``, ``speed``,
    ``on_source_error``, ``on_target_error``, ``id``) and the words, for the kind's own
    ``extra_keys``. :raise UsageError: an unknown key, a missing or bad value."""
    w = parse_words(text, TARGET_JOB_KEYS + extra_keys)
    for key in ("device", "target"):
        if not w.get(key):
            raise UsageError(f"{key}= is required")
    fields = {
        "device": w["device"],
        "target": w["target"],
        "format": choice(w, "format", ["qcow2", "raw", "vhdx"], "qcow2") if "format" in w else None,
        "mode": choice(w, "mode", ["new", "existing"], "new"),
        "sync": choice(w, "sync", ["full", "top", "none"], "full"),
        "speed": size_value(w, "speed"),
        "on_source_error": ErrorAction(choice(w, "on-source-error", _ACTIONS, "report")),
        "on_target_error": ErrorAction(choice(w, "on-target-error", _ACTIONS, "report")),
        "id": job_id(w, w["device"]),
    }
    return fields, w


class OpenedTarget:
    """A job's target, opened: its node, whether it reads as zeroes where nothing was written,
    and the file under it (None where the job did not create or open one itself).

    ``shared_backing``: the node the target's unallocated clusters read from is one of the
    source's (sync=top: the source's backing; sync=none: the source itself), not a second
    open of the same file. The target does not own it: :meth:`close` detaches it first."""

    def __init__(
        self,
        node: Node,
        *,
        zero_init: bool,
        file: TargetFile | RemoteTargetFile | None,
        path: str,
        shared_backing: Node | None = None,
    ) -> None:
        self.node = node
        #: the target as the spec named it (for messages)
        self.path = path
        self.zero_init = zero_init
        self.file = file
        self.shared_backing = shared_backing

    def release_backing(self) -> None:
        """The target no longer reads through the source's node (call before closing it; a
        mirror that switched over keeps it: the source's chain is then the target's)."""
        if self.shared_backing is not None and self.node.backing is self.shared_backing:
            self.node.backing = None
        self.shared_backing = None

    async def reopen(self) -> Node:
        """Read the target again from its file, and return the new node: a target that
        stopped writing after a failed metadata write (qcow2's failsafe, ``write_failure``)
        starts over from what the file holds, which the write order keeps consistent (at
        most leaked clusters). The caller makes sure no request is in flight on the old
        node; it is dropped without closing the file, which the new node takes over. The
        chain below is kept as it is (not opened again).

        :raise BlockfsError: the image cannot be read again (the old node stays).
        """
        old = self.node
        children = old.children()
        if len(children) != 1:
            raise BlockfsError(f"{old.filename}: cannot be reopened", errno=errno.EIO)
        policy = OpenPolicy(given_backing=old.backing)
        new = await open_format(children[0], fmt=old.format_name, read_only=False, policy=policy)
        if new.size != old.size or new.backing is not old.backing:
            raise BlockfsError(f"{old.filename}: changed under the job", errno=errno.EIO)
        self.node = new
        return new

    async def close(self) -> None:
        """Close the target's node and the chain it owns (not a shared backing node)."""
        with trio.CancelScope(shield=True):
            self.release_backing()
            await close_chain(self.node)

    async def discard(self) -> None:
        """Undo the opening: close the node; a file the job made goes (a failed start)."""
        with trio.CancelScope(shield=True):
            try:
                await self.close()
            finally:
                if self.file is not None:
                    await self.file.discard(even_named=True)
                    self.file.close()


async def open_job_target(
    path: str,
    *,
    mode: str,
    fmt: str | None,
    size: int,
    like: Node,
    backing: Node | None = None,
    temporary: bool = True,
    cluster_size: int = 65536,
) -> OpenedTarget:
    """Create (``mode=new``) or open (``mode=existing``) a job's target for a device whose
    root is ``like``, as the module docstring says: no second open by name, no symbolic link
    of another user's, no FIFO. A new target is made under a temporary name (unless
    ``temporary`` is off: a target read while the job runs keeps its name) with the permission
    bits of the device's file, as a ``fmt`` image (qcow2 by default) of ``size`` bytes.

    ``backing``: the node the target reads unallocated clusters from (one of the source's):
    a new qcow2 target records it as its backing file, and the opened target shares that node
    (:class:`OpenedTarget`). An existing target that records a backing file must record that
    one; without ``backing`` it opens its own chain. The file is made and opened in a worker
    thread: a path that leads into this very mount is served meanwhile instead of hanging
    the daemon (the caller refuses such a target by its identity).

    :raise UsageError: EEXIST, ENOENT, EACCES, EINVAL as fits; ImageError: a bad existing
        target.
    """
    if mode == "new":
        fmt = fmt or "qcow2"
        if fmt not in ("qcow2", "raw", "vhdx"):
            raise UsageError(f"format={fmt} targets are not supported (qcow2, raw, vhdx)")
        if fmt == "raw" and backing is not None:
            raise UsageError("a raw target cannot read through a backing file: use format=qcow2")
        if (
            fmt == "vhdx"
            and backing is not None
            and (backing.format_name != "vhdx" or not backing.read_only)
        ):
            # A differencing VHDX names its parent by the parent's DataWriteGuid, which the
            # parent's next write changes: only a parent no one writes (sync=top) will do.
            raise UsageError(
                f"a vhdx target can read through {backing.filename} only if it is a vhdx "
                "image no one writes (sync=top over a vhdx chain); use format=qcow2"
            )
    tfile: TargetFile | RemoteTargetFile
    child: Node | None = None
    remote = scheme_of(path) not in (None, "file")
    if mode == "new" and backing is not None and remote != (
        scheme_of(backing.filename) not in (None, "file")
    ):
        raise UsageError(
            f"target {path} would read through {backing.filename}, on other storage: "
            "use sync=full"
        )
    if remote:
        tfile, child = await RemoteTargetFile.make(path, mode=mode, temporary=temporary)
    elif mode == "new":
        source = protocol_file(like)
        perm = stat.S_IMODE(os.fstat(source.fd).st_mode) & 0o666 if source else 0o600
        tfile = await trio.to_thread.run_sync(
            lambda: TargetFile.create(path, perm, temporary=temporary)
        )
    else:
        tfile = await trio.to_thread.run_sync(lambda: TargetFile.open_existing(path))
    node: Node | None = None
    try:
        if child is None:
            assert isinstance(tfile, TargetFile)
            child = FileNode.from_fd(tfile.fd, tfile.path)
        if mode == "new":
            if fmt == "raw":
                await create_raw(child, size)
            elif fmt == "vhdx":
                await create_vhdx(
                    child,
                    None if backing is not None else size,
                    parent=backing.filename if backing is not None else None,
                    parent_fmt="vhdx" if backing is not None else None,
                )
            else:
                await create_qcow2(
                    child,
                    size,
                    cluster_size=cluster_size,
                    backing=backing.filename if backing is not None else None,
                    backing_fmt=backing.format_name if backing is not None else None,
                )
        policy = OpenPolicy(given_backing=backing)
        if backing is None:
            policy = OpenPolicy.for_paths([tfile.path])
        node = await open_format(child, fmt=fmt, read_only=False, policy=policy)
        if node.size != size:
            raise UsageError(f"target is {node.size} bytes, the device {size}")
    except BaseException:
        with trio.CancelScope(shield=True):
            if node is not None:
                if backing is not None and node.backing is backing:
                    node.backing = None
                await close_chain(node)
            elif child is not None:
                await child.aclose()
            elif isinstance(tfile, TargetFile):
                os.close(tfile.fd)
            await tfile.discard(even_named=True)
            tfile.close()
        raise
    shared = backing if backing is not None and node.backing is backing else None
    # A new target reads as zeroes where nothing was written: zeroes need not be copied.
    # (Not so with a backing file: there, unwritten clusters read from the backing.)
    zero_init = mode == "new" and node.backing is None
    return OpenedTarget(node, zero_init=zero_init, file=tfile, path=path, shared_backing=shared)
