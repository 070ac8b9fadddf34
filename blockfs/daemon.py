"""The life of one mount: open and check every image, mount, serve, and shut down cleanly.

One trio nursery holds the FUSE loop, the signal watcher and the jobs. The daemon is the jobs'
host (:class:`blockfs.jobs.host.JobHost`): jobs reach the mount only through that seam. Shutdown, whatever
starts it (SIGTERM, SIGINT, ``blockfs umount``, ``fusermount3 -u``), runs in this order: the FUSE
loop stops taking requests and lets the in-flight ones finish; jobs are cancelled; every image is
flushed and closed; the mountpoint is released. Nothing is mounted until every image opened, so a
bad image never leaves a half-mounted tree.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import subprocess
from collections.abc import Callable

import pyfuse3
import trio

from blockfs.config import FUSE_THREADS, ImageSpec, MountConfig
from blockfs.control import ControlTree
from blockfs.control.tree import VirtualTree
from blockfs.errors import BlockfsError, UsageError
from blockfs.export import Export
from blockfs.fs import BlockfsOperations, ImageFile
from blockfs.fuseloop import FuseLoop, session_fds
from blockfs.jobs.host import PublishedFile
from blockfs.jobs.job import EventLog
from blockfs.jobs.registry import JobRegistry
from blockfs.nodes.base import Node
from blockfs.nodes.file import SERVED_DEVICES
from blockfs.nodes.registry import (
    OpenPolicy,
    check_shared_files,
    close_chain,
    open_image,
)
from blockfs.values import spec_text

log = logging.getLogger(__name__)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas before the I/O threads start: each thread would
    otherwise keep the 1 MiB buffers it freed in an arena of its own (measured: peak RSS 73 ->
    58 MiB under 1 MiB reads, no loss of throughput)."""
    import ctypes

    M_ARENA_MAX = -8
    try:
        libc = ctypes.CDLL(None)  # libc, without find_library's ldconfig run
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def mount_state(path: str) -> str:
    """ "missing", "notdir", "stale" (a dead FUSE mount), "mounted", or "free"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return "stale"
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        return "notdir"
    del st
    return "mounted" if os.path.ismount(path) else "free"


def detach_stale(path: str) -> None:
    """Lazily unmount a FUSE mount whose daemon is gone (after a kill -9)."""
    res = subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)


def fuse_device(path: str) -> int | None:
    """The device number (``st_dev``) of the file system mounted on ``path``, read from
    ``/proc/self/mountinfo``: a stat of our own mount from the event loop would wait on the
    event loop itself."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and unescape_mountinfo(fields[4]) == path:
            major, _, minor = fields[2].partition(":")
            found = os.makedev(int(major), int(minor))  # the last one is on top
    return found


def unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def check_mountpoint(path: str) -> None:
    """:raise UsageError: the mountpoint cannot be used; a stale mount is recovered."""
    state = mount_state(path)
    if state == "stale":
        log.warning("%s: recovering a stale mount (its daemon died)", path)
        detach_stale(path)
        state = mount_state(path)
    if state == "missing":
        raise UsageError(f"mountpoint {path}: no such directory", errno=errno.ENOENT)
    if state == "notdir":
        raise UsageError(f"mountpoint {path}: not a directory", errno=errno.ENOTDIR)
    if state == "mounted":
        raise UsageError(
            f"mountpoint {path}: something is mounted there already", errno=errno.EBUSY
        )
    if state == "stale":
        raise UsageError(
            f"mountpoint {path}: a dead mount is still there; run blockfs umount {path}"
        )


class Daemon:
    """Everything one mount owns; the host of its jobs (:class:`JobHost`)."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.mountpoint = os.path.abspath(config.mountpoint)
        self.tree = VirtualTree()
        self.ops = BlockfsOperations(
            self.tree,
            image_mode=config.image_mode,
            image_uid=config.image_uid,
            image_gid=config.image_gid,
        )
        self.exports: dict[str, Export] = {}
        self._events = EventLog()
        self.jobs = JobRegistry(self)
        self.control: ControlTree | None = None
        self._nursery: trio.Nursery | None = None
        #: warnings for the user who mounts (a probed format), sent with the ready answer
        self.warnings: list[str] = []
        #: the FUSE loop of reader threads, when it serves the session (blockfs.fuseloop)
        self.loop: FuseLoop | None = None
        #: st_dev of this mount's files, once mounted (see nodes.file.SERVED_DEVICES)
        self.mount_dev: int | None = None
        #: the file of each image under the mountpoint
        self._files: dict[str, ImageFile] = {}
        #: images added while mounted (their paths are named paths for the open policy)
        self._added: list[ImageSpec] = []
        self._hot_lock = trio.Lock()

    async def open_images(self) -> None:
        """Open every image; on any failure close what was opened and raise."""
        named = [s.path for s in self.config.images]
        try:
            for spec in self.config.images:
                read_only = self.config.read_only or spec.read_only
                policy = OpenPolicy.for_paths(
                    named, spec.backing_dirs, warn=functools.partial(self._warn, spec.name)
                )
                try:
                    node = await open_image(
                        spec.path,
                        fmt=spec.format,
                        read_only=read_only,
                        policy=policy,
                        inject=spec.inject,
                    )
                except BlockfsError as exc:
                    raise type(exc)(f"image {spec.name}: {exc}", errno=exc.errno) from None
                try:
                    others = {n: e.root for n, e in self.exports.items()}
                    check_shared_files(f"image {spec.name}", node, others)
                except BlockfsError:
                    await close_chain(node)
                    raise
                self.exports[spec.name] = Export(spec.name, node, read_only=read_only)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.close_images()
            raise

    # -- the jobs' host (blockfs.jobs.host.JobHost) ------------------------------------------

    @property
    def events(self) -> EventLog:
        return self._events

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the mount is not serving yet")
        return self._nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery

    def export(self, name: str) -> Export | None:
        return self.exports.get(name)

    def publish_view(self, export: Export, *, like: Export) -> PublishedFile:
        return self.ops.add_image(self.tree.root, export, like=like)

    def withdraw_view(self, file: PublishedFile) -> None:
        assert isinstance(file, ImageFile)
        self.ops.remove_image(file)

    def check_not_in_use(
        self,
        what: str,
        node: Node,
        *,
        with_backing: bool = False,
        as_writer: bool = False,
        except_device: str | None = None,
    ) -> None:
        others: dict[str, Node] = {n: e.root for n, e in self.exports.items() if n != except_device}
        check_shared_files(what, node, others, with_backing=with_backing, as_writer=as_writer)

    # -- the tree ------------------------------------------------------------------------------

    def build_tree(self) -> None:
        """One file per image and the control tree (once the images are open)."""
        for export in self.exports.values():
            self._files[export.name] = self.ops.add_image(self.tree.root, export)
        self.control = ControlTree(
            self.tree,
            self.exports,
            self.events,
            self.jobs,
            add_image=self._hot_add,
            remove_image=self._hot_remove,
        )

    # -- hot add and remove (images/add, images/remove) ----------------------------------------

    def _named_paths(self) -> list[str]:
        return [s.path for s in self.config.images] + [s.path for s in self._added]

    async def _hot_add(self, data: bytes) -> bytes:
        """``NAME=SPEC`` written to ``images/add``: open one more image and show its file.

        The spec has the mount command line's syntax; a local path must be absolute (the
        daemon's folder is not the writer's). The image is opened as at mount time (the same
        open policy, the same refusals of files another image uses), off the event loop.

        :raise UsageError: a bad spec, a name that is taken (EEXIST), an image that cannot be
            opened; nothing is left open then.
        """
        from blockfs.imagespec import parse_image_spec
        from blockfs.nodes.protocols import scheme_of

        text = spec_text(data, "image spec").strip()
        if not text or "\n" in text:
            raise UsageError("write one image spec: NAME=SPEC (as on the mount command line)")
        spec = parse_image_spec(text)
        if scheme_of(spec.path) in (None, "file") and not os.path.isabs(spec.path):
            raise UsageError(f"{spec.path}: give an absolute path (the daemon runs in /)")
        async with self._hot_lock:
            self._check_free_name(spec.name)
            read_only = self.config.read_only or spec.read_only
            policy = OpenPolicy.for_paths(
                [*self._named_paths(), spec.path],
                spec.backing_dirs,
                warn=functools.partial(self._warn_live, spec.name),
            )
            try:
                node = await open_image(
                    spec.path, fmt=spec.format, read_only=read_only, policy=policy,
                    inject=spec.inject,
                )  # fmt: skip
            except BlockfsError as exc:
                raise type(exc)(f"image {spec.name}: {exc}", errno=exc.errno) from None
            try:
                others = {n: e.root for n, e in self.exports.items()}
                check_shared_files(f"image {spec.name}", node, others)
                self._check_free_name(spec.name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await close_chain(node)
                raise
            export = Export(spec.name, node, read_only=read_only)
            self.exports[spec.name] = export
            self._added.append(spec)
            self._files[spec.name] = self.ops.add_image(self.tree.root, export)
            assert self.control is not None
            self.control.add_image(export)
            # a lookup of the name before it existed may be cached as "no such file"
            self.ops.invalidate_entry(self.tree.root.inode, os.fsencode(spec.name))
        self.events.emit("IMAGE_ADDED", device=spec.name, format=node.format_name)
        log.info("image %s added: %s (%s)", spec.name, node.filename, node.format_name)
        return f"{spec.name}\n".encode()

    def _check_unused(self, name: str, file: ImageFile) -> None:
        """:raise UsageError: (EBUSY) a job holds the image, or its file is open."""
        self.jobs.device(name)
        handles = self.tree.open_count(file.inode)
        if handles:
            raise UsageError(
                f"image {name!r} is open ({handles} handle{'s' if handles > 1 else ''}); "
                "close it first",
                errno=errno.EBUSY,
            )

    def _check_free_name(self, name: str) -> None:
        if name in self.exports or name in self.tree.root.children:
            raise UsageError(f"there is an image named {name!r} already", errno=errno.EEXIST)

    def _warn_live(self, image: str, message: str) -> None:
        log.warning("image %s: %s", image, message)

    async def _hot_remove(self, data: bytes) -> bytes:
        """``NAME`` written to ``images/remove``: flush the image and close it; its file and
        its control folder go away.

        :raise UsageError: no such image (ENOENT); a job uses it or someone holds its file open
            (EBUSY); its flush failed (EIO: the image stays, as it was).
        """
        name = spec_text(data, "image name").strip()
        async with self._hot_lock:
            export = self.exports.get(name)
            if export is None:
                raise UsageError(f"no image {name!r}", errno=errno.ENOENT)
            file = self._files[name]
            self._check_unused(name, file)
            if not export.read_only:
                try:
                    await export.flush()
                except BlockfsError as exc:
                    raise UsageError(
                        f"image {name!r}: flush failed, the image stays: {exc}", errno=errno.EIO
                    ) from None
            # Checked again after the flush's await, then gone from the tree at once (no await
            # in between): no new open can find it; then closed.
            self._check_unused(name, file)
            self.ops.remove_image(file)
            assert self.control is not None
            self.control.remove_image(name)
            del self._files[name]
            del self.exports[name]
            self._added = [s for s in self._added if s.name != name]
            with trio.CancelScope(shield=True):
                await export.close_direct()
                try:
                    await close_chain(export.root)
                except Exception as exc:
                    log.error("closing %s failed: %s", name, exc)
        self.events.emit("IMAGE_REMOVED", device=name)
        log.info("image %s removed", name)
        return b"ok\n"

    def _warn(self, image: str, message: str) -> None:
        self.warnings.append(f"image {image}: {message}")

    async def close_images(self) -> None:
        """Flush and close every image; errors are logged, and every image gets its turn."""
        # No FUSE reader thread touches an image from here on (views included).
        for export in {*self.exports.values(), *self.ops.exports_by_handle.values()}:
            await export.close_direct()
        for export in list(self.exports.values()):
            try:
                if not export.read_only:
                    await export.root.flush()
            except Exception as exc:
                log.error("flushing %s failed: %s", export.name, exc)
            try:
                await close_chain(export.root)
            except Exception as exc:
                log.error("closing %s failed: %s", export.name, exc)
        self.exports.clear()

    def _fuse_options(self) -> set[str]:
        opts = set(pyfuse3.default_options)
        fsname = self.config.fsname.replace("\\", "\\\\").replace(",", "\\,")
        opts |= {f"fsname={fsname}", "subtype=blockfs"}
        if self.config.allow_other:
            opts.add("allow_other")
        if self.config.read_only:
            opts.add("ro")
        opts.update(self.config.extra_fuse_options)
        return opts

    async def run(self, ready: Callable[[str | None, list[str]], None]) -> None:
        """Serve until unmounted or signalled. ``ready(None, warnings)`` is called once the
        mount is up, ``ready(message, warnings)`` when start-up failed (the error is raised
        too); ``warnings`` are for the user who mounts."""
        limit_malloc_arenas()
        try:
            check_mountpoint(self.mountpoint)
            await self.open_images()
            self.build_tree()
            before = session_fds()
            try:
                pyfuse3.init(self.ops, self.mountpoint, self._fuse_options())
            except RuntimeError as exc:
                raise BlockfsError(f"cannot mount on {self.mountpoint}: {exc}") from None
            try:
                self.loop = self._take_session(before)
            except BaseException:
                pyfuse3.close(unmount=True)
                raise
        except BaseException as exc:
            ready(
                str(exc) if isinstance(exc, BlockfsError) else f"start-up failed: {exc!r}",
                self.warnings,
            )
            with trio.CancelScope(shield=True):
                await self.close_images()
            raise
        self.mount_dev = fuse_device(self.mountpoint)
        if self.mount_dev is not None:
            SERVED_DEVICES.add(self.mount_dev)
        log.info("mounted %d image(s) on %s", len(self.exports), self.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._watch_signals)
                ready(None, self.warnings)
                try:
                    if self.loop is not None:
                        await self.loop.serve()
                    else:
                        await pyfuse3.main(min_tasks=4, max_tasks=self.config.fuse_tasks)
                finally:
                    # Jobs end first (their filters leave the graph), while the nursery that
                    # runs them is still alive; then the watcher goes.
                    with trio.CancelScope(shield=True):
                        await self.jobs.aclose()
                    nursery.cancel_scope.cancel()
                    self.nursery = None
        finally:
            with trio.CancelScope(shield=True):
                await self.close_images()
            pyfuse3.close(unmount=True)
            if self.loop is not None:
                self.loop.close()
                if self.loop.held_requests:
                    log.info("%d requests to remote images went out in %d sends",
                             self.loop.held_requests, self.loop.held_sends)  # fmt: skip
            if self.mount_dev is not None:
                SERVED_DEVICES.discard(self.mount_dev)
            log.info("unmounted %s", self.mountpoint)

    def _take_session(self, before: set[int]) -> FuseLoop | None:
        """The FUSE loop of reader threads answers the session pyfuse3 just mounted
        (blockfs.fuseloop), or None: pyfuse3's own loop will.

        ``fuse_threads`` None (auto, the default): threads when some image has a direct data
        path (a local raw, qcow2 or VHDX image; a raw image on an ssh host, whose reads and
        writes the threads send to its SFTP session themselves); 0: pyfuse3's loop; N: N
        threads. Images without one (gluster, a qcow2 or VHDX image on an ssh host) gain
        nothing from the threads and would pay for them: each of their requests then goes
        from a reader thread to the event loop, one more thread wake-up (~40 us here) than
        pyfuse3's loop. One thread where every such image is on an ssh host: its requests
        are only sent (never waited for) in the thread, which sends those queued together in
        one pipe write; a second thread takes half of them and contends for the GIL
        (measured: 4 KiB reads at queue depth 16, 18.2k IOPS with one, 14.6k with two).
        """
        threads = self.config.fuse_threads
        if threads is None:
            direct = [e for e in self.exports.values() if e.has_direct_path]
            threads = (1 if all(e.submits for e in direct) else FUSE_THREADS) if direct else 0
        if threads <= 0:
            log.info("FUSE requests: pyfuse3's loop")
            return None
        fds = session_fds() - before
        if len(fds) != 1:
            raise BlockfsError("cannot find the FUSE session's descriptor")
        loop = FuseLoop(self.ops, fds.pop(), threads=threads, max_tasks=self.config.fuse_tasks)
        loop.handshake()
        self.ops.invalidate_entry = loop.invalidate_entry
        log.info("FUSE requests: %d reader thread%s (protocol 7.%d)", threads,
                 "" if threads == 1 else "s", loop.minor)  # fmt: skip
        return loop

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                if self.loop is not None:
                    self.loop.terminate()
                else:
                    pyfuse3.terminate()
                return
