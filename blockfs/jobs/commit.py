"""Commit: fold images of a device's backing chain down into a base image below them, while
the device is in use (QEMU's block-commit).

``top`` (default: the active layer) and ``base`` (default: the bottom of the chain) name
layers as :mod:`blockfs.jobs.chain` says. Every cluster that a layer from top down to (not
including) base holds is written into base; base is reopened read-write for it, and read-only
again afterwards. What base gains is hidden from every reader by the layers above it, so the
device reads the same at every instant, and a crash at any moment leaves a valid chain.

*Intermediate commit* (top below the active layer, :class:`CommitJob`): the layers are
read-only, so one pass copies everything. Then, at a quiescent point, the image above top
records base as its backing file (a name relative to its folder where its old name was
relative, or ``backing-file=``) and reads through it; top and the layers down to base leave
the chain, their files untouched. The job then completes on its own.

*Active commit* (top is the active layer, :class:`ActiveCommitJob`): a mirror whose target is
base: the mirror filter marks what the guest writes, the engine copies until base is in sync,
READY, and ``complete`` switches the device to base (same file, open handles keep working) and
drops the layers above it; ``cancel`` in READY leaves the chain as it was (base holds more
than before, all of it hidden).

Differencing VHDX images name their parent by its DataWriteGuid, which base's first write
changes: before base is written, the image above it records the new one as its second linkage
(:meth:`Node.parent_will_change`), so a crash never leaves the chain unopenable.
"""

from __future__ import annotations

import errno
import logging

import trio

from blockfs.errors import BlockfsError, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import BlockCopy, CopyError, RateLimiter, TargetError, job_cluster_size
from blockfs.jobs.chain import (
    CHAIN_WORKERS,
    ChainSpec,
    chain_layers,
    check_can_back,
    close_layers,
    find_layer,
    mark_held_above,
    new_backing_name,
    stitch,
)
from blockfs.jobs.host import JobHost
from blockfs.jobs.job import Job, JobFailed
from blockfs.jobs.mirror import DEFAULT_BUF_SIZE, MirrorJob, MirrorSpec
from blockfs.jobs.target import OpenedTarget
from blockfs.nodes.base import Node

log = logging.getLogger(__name__)

#: the unit a commit tracks and copies in (below: more requests; above: more copied for
#: each small write the guest makes during an active commit)
COMMIT_GRANULARITY = 65536


def _checked_chain(spec: ChainSpec, export: Export, what: str) -> list[Node]:
    """:raise UsageError: a read-only device (EROFS), or one with no backing file."""
    if export.read_only:
        raise UsageError(
            f"device {export.name!r} is mounted read-only: a {what} would write its chain",
            errno=errno.EROFS,
        )
    layers = chain_layers(export.root)
    if len(layers) < 2:
        raise UsageError(f"device {export.name!r} has no backing file: nothing to {what}")
    return layers


def make_commit(spec: ChainSpec, host: JobHost, export: Export, target: object) -> Job:
    """The registry's factory for ``jobs/commit``: an intermediate or an active commit.

    :raise UsageError: a layer that is not in the chain (ENOENT), a base not below top, a
        base that cannot hold top's data, an image that cannot record base (EINVAL).
    """
    layers = _checked_chain(spec, export, "commit")
    top = find_layer(layers, spec.top, "top", export.name) if spec.top is not None else 0
    if spec.base is not None:
        base = find_layer(layers, spec.base, "base", export.name)
    else:
        base = len(layers) - 1
    if base <= top:
        raise UsageError(
            f"base {layers[base].filename} is not below top {layers[top].filename} in the "
            f"chain of {export.name!r}"
        )
    top_node, base_node = layers[top], layers[base]
    if base_node.size < top_node.size:
        raise UsageError(
            f"base {base_node.filename} ({base_node.size} bytes) cannot hold the data of "
            f"{top_node.filename} ({top_node.size} bytes)"
        )
    if top == 0:
        if base_node.size != top_node.size:
            raise UsageError(
                f"base {base_node.filename} is larger than the device: the device would "
                "change size at the switch"
            )
        if spec.backing_file is not None:
            raise UsageError("backing-file= is for an intermediate commit (top below the "
                             "active layer): an active commit drops the layers above base")  # fmt: skip
        return ActiveCommitJob(spec, host, export, layers, base)
    check_can_back(layers[top - 1], base_node)
    return CommitJob(spec, host, export, layers, top, base)


async def open_base_for_writing(
    host: JobHost, export: Export, layers: list[Node], base: int
) -> bool:
    """At a quiescent point: make the base writable (True if it was read-only), and let
    the image above it prepare for its writes.

    :raise UsageError: another device uses the base's file (EBUSY), or it cannot be opened
        for writing (EACCES, EBUSY); nothing is changed then.
    """
    base_node = layers[base]
    host.check_not_in_use(
        f"base {base_node.filename}", base_node, as_writer=True, except_device=export.name
    )
    reopened = False
    async with export.quiesced():
        try:
            if base_node.read_only:
                await base_node.reopen(False)
                reopened = True
            await layers[base - 1].parent_will_change(base_node)
        except BaseException:
            if reopened:
                with trio.CancelScope(shield=True):
                    await _reopen_read_only(base_node)
            raise
    return reopened


async def _reopen_read_only(node: Node) -> None:
    try:
        await node.flush()
        await node.reopen(True)
    except BlockfsError as exc:
        log.warning("%s stays writable: %s", node.filename, exc)


async def _leave_base(base: Node, child: Node, reopened: bool) -> None:
    """A commit ended with ``child`` still over ``base`` (the device quiesced): base is made
    durable, ``child`` records what base is now (:meth:`Node.parent_settled`), and base is
    read-only again if the commit made it writable."""
    try:
        await base.flush()
        await child.parent_settled(base)
    except BlockfsError as exc:
        log.warning("%s: recording its parent %s failed: %s", child.filename, base.filename, exc)
    if reopened:
        await _reopen_read_only(base)


class CommitJob(Job):
    """Intermediate commit: see the module docstring."""

    type = "commit"

    def __init__(
        self, spec: ChainSpec, host: JobHost, export: Export, layers: list[Node], top: int,
        base: int,
    ) -> None:  # fmt: skip
        super().__init__(spec.id, export.name, host.events)
        self.spec = spec
        self.host = host
        self.export = export
        self.speed = spec.speed
        self.layers = layers
        self.above = layers[top - 1]
        self.top = layers[top]
        self.base = layers[base]
        self._base_depth = base
        self.dropped = layers[top:base]
        self.backing_name = new_backing_name(self.above, self.base, spec.backing_file)
        cs = job_cluster_size(self.top.size, COMMIT_GRANULARITY)
        self.copy = BlockCopy(
            self.top, self.base, cs, target_zero_init=False, base=self.base
        )
        self.copy.on_progress = self._progress
        self._base_reopened = False
        self.stitched = False

    def _progress(self, nbytes: int) -> None:
        self.offset += nbytes

    async def start(self) -> None:
        self._base_reopened = await open_base_for_writing(
            self.host, self.export, self.layers, self._base_depth
        )

    async def _initial_bitmap(self) -> None:
        """Mark what a layer from top down to base holds."""
        await mark_held_above(self.copy, self.top, self.base, self.top.size, self.checkpoint)
        self.len = min(self.top.size, self.copy.bitmap.count * self.copy.cluster_size)

    async def run(self) -> None:
        await self._initial_bitmap()
        await self.copy.run(
            workers=CHAIN_WORKERS,
            on_error=self._copy_failed,
            limiter=RateLimiter(lambda: self.speed),
            checkpoint=self.checkpoint,
            on_workers=self.set_body_tasks,
            max_passes=None,
        )
        self.len = self.offset
        try:
            await self.base.flush()
        except BlockfsError as exc:
            raise JobFailed(f"flushing base failed: {exc}", errno=exc.errno) from None
        await self.checkpoint()
        # The image above top now names base; top and what lies between leave the chain.
        async with self.export.quiesced():
            try:
                with trio.CancelScope(shield=True):  # the metadata and the chain agree
                    await stitch(
                        self.above, self.base, self.backing_name,
                        keep_writable=self.above is self.layers[0],
                    )  # fmt: skip
            except BlockfsError as exc:
                raise JobFailed(
                    f"{self.above.filename}: recording base as its backing file failed: {exc}",
                    errno=exc.errno,
                ) from None
            self.stitched = True
        await close_layers(self.dropped)

    async def _copy_failed(self, exc: CopyError) -> bool:
        if isinstance(exc, TargetError):
            return await self.io_error(self.spec.on_error, exc.cause, "write", "base write failed")
        return await self.io_error(self.spec.on_error, exc.cause, "read", "read of top failed")

    async def finalize(self, ok: bool) -> None:
        async with self.export.quiesced():
            if self.stitched:
                if self._base_reopened:
                    await _reopen_read_only(self.base)
            else:
                child = self.layers[self._base_depth - 1]
                await _leave_base(self.base, child, self._base_reopened)

    def status(self) -> dict[str, object]:
        st = super().status()
        st["top"] = self.top.filename
        st["base"] = self.base.filename
        st["backing-file"] = self.backing_name
        st["stitched"] = self.stitched
        return st


class _ChainTarget(OpenedTarget):
    """An active commit's target: base, a layer of the device's own chain. The job does not
    own it: closing it makes it read-only again (unless the device switched to it)."""

    def __init__(self, base: Node, child: Node, export: Export) -> None:
        super().__init__(base, zero_init=False, file=None, path=base.filename)
        self.export = export
        #: the image directly above base
        self.child = child
        self.reopened = False

    async def reopen(self) -> Node:
        raise BlockfsError(
            f"{self.node.filename}: stopped writing after a failure; a base in a chain is not "
            "read again while mounted",
            errno=errno.EIO,
        )

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            async with self.export.quiesced():
                await _leave_base(self.node, self.child, self.reopened)

    async def discard(self) -> None:
        await self.close()


class ActiveCommitJob(MirrorJob):
    """Active commit: see the module docstring."""

    type = "commit"

    def __init__(
        self, spec: ChainSpec, host: JobHost, export: Export, layers: list[Node], base: int
    ) -> None:
        base_node = layers[base]
        mspec = MirrorSpec(
            device=spec.device,
            target=base_node.filename,
            format=base_node.format_name,
            mode="existing",
            sync="top",
            granularity=COMMIT_GRANULARITY,
            buf_size=DEFAULT_BUF_SIZE,
            speed=spec.speed,
            copy_mode="background",
            on_source_error=spec.on_error,
            on_target_error=spec.on_error,
            id=spec.id,
        )
        self.chain_target = _ChainTarget(base_node, layers[base - 1], export)
        super().__init__(mspec, host, export, self.chain_target)
        self.chain_spec = spec
        self.layers = layers
        self._base_depth = base
        self.base = base_node
        self.dropped = layers[:base]
        self.copy.base = base_node
        self.target_state = "committing"

    async def start(self) -> None:
        self.chain_target.reopened = await open_base_for_writing(
            self.host, self.export, self.layers, self._base_depth
        )
        try:
            await super().start()
        except BaseException:
            await self.chain_target.close()
            raise

    async def _initial_bitmap(self) -> None:
        """Mark what a layer above base holds."""
        top = self.layers[0]
        await mark_held_above(self.copy, top, self.base, top.size, self.checkpoint)

    async def _retire_source(self, old_root: Node) -> None:
        """After the switch: the layers above base leave the chain, their files as they were
        at the switch (flushed), base's chain stays."""
        for layer in self.dropped:
            if not layer.read_only:
                try:
                    await layer.flush()
                except BlockfsError as exc:
                    log.warning("job %s: flushing %s failed: %s", self.id, layer.filename, exc)
        await close_layers(self.dropped)
        self.target_state = "switched: the device now serves base"

    def status(self) -> dict[str, object]:
        st = super().status()
        for key in ("target", "sync", "copy-mode", "partial-target"):
            st.pop(key, None)
        st["top"] = self.layers[0].filename
        st["base"] = self.base.filename
        return st
