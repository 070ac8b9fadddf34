"""The registry of protocols and formats: schemes, relative backing names, identity (loops and
shared files through links), declared capabilities and limits. Below FUSE, in seconds."""

from __future__ import annotations

import errno
import os
from collections.abc import Hashable
from pathlib import Path
from typing import ClassVar

import pytest

from blockfs.errors import ImageError, UsageError
from blockfs.info import chain_info
from blockfs.nodes.base import PASSED_CAPABILITIES, Capability, Node
from blockfs.nodes.file import FileNode
from blockfs.nodes.inject import InjectFilter
from blockfs.nodes.protocols import (
    PROTOCOLS,
    FileProtocol,
    ProtocolDriver,
    resolve_backing,
    scheme_of,
)
from blockfs.nodes.registry import (
    OpenPolicy,
    chain_files,
    check_shared_files,
    close_chain,
    open_image,
)
from blockfs.nodes.retry import RetryFilter, RetryPolicy
from blockfs.nodes.threads import shared_pool
from conftest import qemu_img

MiB = 1024 * 1024


def raw_image(path: Path, size: int = MiB) -> Path:
    path.write_bytes(b"\xab" * 4096 + bytes(size - 4096))
    return path


def qcow2_over(path: Path, backing: str, fmt: str = "qcow2") -> Path:
    """A qcow2 image whose header names ``backing`` as written (not checked, not resolved)."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", fmt, str(path))
    return path


# -- schemes ---------------------------------------------------------------------------------


def test_scheme_is_what_precedes_colon_slash_slash() -> None:
    assert scheme_of("/srv/a.img") is None
    assert scheme_of("a.img") is None
    assert scheme_of("dir/x://y") is None  # a relative path, not a scheme
    assert scheme_of("file:///srv/a.img") == "file"
    assert scheme_of("SSH://host/a") == "ssh"


async def test_a_plain_path_and_a_file_uri_open_the_same_file(tmp_path: Path) -> None:
    img = raw_image(tmp_path / "a.raw")
    plain = await open_image(str(img), fmt="raw", read_only=True)
    uri = await open_image(f"file://{img}", fmt="raw", read_only=True)
    try:
        st = os.stat(img)
        assert plain.identity() == uri.identity() == (st.st_dev, st.st_ino)
        assert await uri.read(0, 2) == b"\xab\xab"
    finally:
        await close_chain(plain)
        await close_chain(uri)


async def test_an_unknown_protocol_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(UsageError) as err:
        await open_image("nbd://host/srv/a.img")
    assert str(err.value) == (
        "nbd://host/srv/a.img: unknown protocol 'nbd' "
        "(known: file, gluster, gluster+rdma, gluster+tcp, gluster+unix, ssh)"
    )


async def test_a_file_uri_needs_an_absolute_path() -> None:
    with pytest.raises(UsageError, match="absolute path"):
        await open_image("file://host/srv/a.img")


async def test_a_backing_file_of_an_unknown_protocol_is_an_image_error(tmp_path: Path) -> None:
    top = qcow2_over(tmp_path / "top.qcow2", "gopher://host/base.img", fmt="raw")
    with pytest.raises(ImageError, match="unknown protocol 'gopher'"):
        await open_image(str(top), fmt="qcow2", read_only=True)


class _MemoryNode(Node):
    """A protocol node over bytes in memory, with an identity of its own."""

    format_name = "mem"

    def __init__(self, name: str, size: int) -> None:
        self.filename, self.size, self.read_only = name, size, False
        self.data = bytearray(size)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def identity(self) -> Hashable:
        return ("mem", self.filename)


class _MemoryProtocol(ProtocolDriver):
    name = "mem"
    retry: ClassVar[RetryPolicy | None] = RetryPolicy(retries=2)

    async def open(self, location: str, *, read_only: bool) -> Node:
        return _MemoryNode(location, MiB)

    def resolve(self, relative_to: str, name: str) -> str:
        return relative_to.rsplit("/", 1)[0] + "/" + name

    def real_location(self, node: Node) -> str:
        return node.filename


async def test_a_new_protocol_is_one_table_entry_and_gets_its_retry_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PROTOCOLS, "mem", _MemoryProtocol())
    node = await open_image("mem://box/disk", fmt="raw")
    try:
        below = node.children()[0]
        assert isinstance(below, RetryFilter) and below.policy.retries == 2
        assert node.identity() == ("mem", "mem://box/disk")
        assert resolve_backing("mem://box/disk", "base") == "mem://box/base"
    finally:
        await close_chain(node)


# -- relative backing names --------------------------------------------------------------------


def test_relative_backing_names_resolve_against_the_overlay_folder() -> None:
    f = FileProtocol()
    assert f.resolve("/srv/vm/top.qcow2", "base.qcow2") == "/srv/vm/base.qcow2"
    assert f.resolve("/srv/vm/top.qcow2", "../b/base.qcow2") == "/srv/vm/../b/base.qcow2"
    assert f.resolve("/srv/vm/top.qcow2", "/abs/base.qcow2") == "/abs/base.qcow2"
    assert f.resolve("top.qcow2", "base.qcow2") == "./base.qcow2"
    assert resolve_backing("file:///srv/vm/top.qcow2", "base.qcow2") == "/srv/vm/base.qcow2"
    # A name with a scheme stands alone, whatever the overlay's protocol.
    assert resolve_backing("/srv/vm/top.qcow2", "file:///b/x") == "file:///b/x"


async def test_a_relative_backing_file_is_found_from_any_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    raw_image(vm / "base.raw")
    top = qcow2_over(vm / "top.qcow2", "base.raw", fmt="raw")
    monkeypatch.chdir(tmp_path)
    node = await open_image(str(top), fmt="qcow2", read_only=True)
    try:
        assert node.backing is not None
        assert node.backing.filename == str(vm / "base.raw")
        assert await node.read(0, 2) == b"\xab\xab"
    finally:
        await close_chain(node)


# -- identity: loops and shared files ------------------------------------------------------------


@pytest.mark.parametrize("link", ["hard", "symbolic"])
async def test_a_chain_looping_back_through_a_link_is_refused(tmp_path: Path, link: str) -> None:
    top = qcow2_over(tmp_path / "top.qcow2", "alias.qcow2")
    if link == "hard":
        os.link(top, tmp_path / "alias.qcow2")
    else:
        os.symlink("top.qcow2", tmp_path / "alias.qcow2")
    with pytest.raises(ImageError, match="loops back") as err:
        await open_image(str(top), fmt="qcow2", read_only=True)
    assert err.value.errno == errno.ELOOP


async def test_a_longer_loop_is_refused(tmp_path: Path) -> None:
    qcow2_over(tmp_path / "a.qcow2", "b.qcow2")
    qcow2_over(tmp_path / "b.qcow2", "a.qcow2")
    with pytest.raises(ImageError, match="loops back"):
        await open_image(str(tmp_path / "a.qcow2"), fmt="qcow2", read_only=True)


async def test_identity_is_the_file_through_formats_and_filters(tmp_path: Path) -> None:
    img = raw_image(tmp_path / "a.raw")
    node = await open_image(str(img), fmt="raw", inject=True)
    try:
        st = os.stat(img)
        assert isinstance(node.children()[0], InjectFilter)
        assert node.identity() == node.children()[0].identity() == (st.st_dev, st.st_ino)
        assert chain_files(node) == [((st.st_dev, st.st_ino), True, str(img))]
    finally:
        await close_chain(node)


async def test_one_file_through_a_hard_link_is_one_shared_file(tmp_path: Path) -> None:
    img = raw_image(tmp_path / "a.raw")
    os.link(img, tmp_path / "b.raw")
    writer = await open_image(str(img), fmt="raw")
    reader = await open_image(str(tmp_path / "b.raw"), fmt="raw", read_only=True)
    try:
        with pytest.raises(UsageError, match="in use by image w") as err:
            check_shared_files("r", reader, {"w": writer})
        assert err.value.errno == errno.EBUSY
    finally:
        await close_chain(writer)
        await close_chain(reader)


async def test_two_readers_of_one_file_may_share_it(tmp_path: Path) -> None:
    img = raw_image(tmp_path / "a.raw")
    os.symlink(img, tmp_path / "link.raw")
    one = await open_image(str(img), fmt="raw", read_only=True)
    two = await open_image(str(tmp_path / "link.raw"), fmt="raw", read_only=True)
    try:
        check_shared_files("two", two, {"one": one})
    finally:
        await close_chain(one)
        await close_chain(two)


async def test_a_node_with_no_storage_has_no_identity_and_shares_nothing() -> None:
    class View(_MemoryNode):
        def identity(self) -> Hashable | None:
            return None

    view = View("view", MiB)
    assert view.identity() is None and chain_files(view) == []
    assert "actual-size" not in (await chain_info(view))[0]


# -- the probing confinement rule, below FUSE ----------------------------------------------------


async def test_a_probed_image_follows_backing_files_only_where_allowed(tmp_path: Path) -> None:
    outside = raw_image(tmp_path / "secret.raw")
    images = tmp_path / "images"
    images.mkdir()
    top = qcow2_over(images / "top.qcow2", str(outside), fmt="raw")
    with pytest.raises(ImageError, match="lies outside") as err:
        await open_image(str(top), read_only=True)  # probed
    assert err.value.errno == errno.EACCES
    for policy in (
        OpenPolicy.for_paths([str(top)], backing_dirs=[str(tmp_path)]),
        OpenPolicy.for_paths([str(top), str(outside)]),  # named by the user
    ):
        node = await open_image(str(top), read_only=True, policy=policy)
        await close_chain(node)
    node = await open_image(str(top), fmt="qcow2", read_only=True)  # given: trusted
    await close_chain(node)


# -- capabilities and limits ---------------------------------------------------------------------


async def test_capabilities_are_declared_and_filters_pass_on_only_operations(
    tmp_path: Path,
) -> None:
    raw = await open_image(str(raw_image(tmp_path / "a.raw")), fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M")
    q = await open_image(str(tmp_path / "b.qcow2"), fmt="qcow2")
    try:
        file_caps = raw.children()[0].capabilities
        assert file_caps == FileNode.capabilities == PASSED_CAPABILITIES
        assert raw.capabilities == file_caps  # raw passes its file's operations on
        assert Capability.COMPRESSED_WRITES in q.capabilities
        assert Capability.ZERO in q.capabilities
        over_q = InjectFilter(q)  # a filter has no write_compressed: it must not claim it
        assert over_q.capabilities == q.capabilities & PASSED_CAPABILITIES
        assert Capability.COMPRESSED_WRITES not in over_q.capabilities
        assert _MemoryNode("m", 1).capabilities == Capability(0)
    finally:
        await close_chain(raw)
        await close_chain(q)


async def test_the_file_node_reports_its_pool_as_most_requests_in_flight(tmp_path: Path) -> None:
    node = await open_image(str(raw_image(tmp_path / "a.raw")), fmt="raw")
    try:
        assert node.limits.max_inflight == shared_pool().size
        assert node.children()[0].limits.max_inflight == shared_pool().size
    finally:
        await close_chain(node)


async def test_describe_does_no_io_and_info_awaits_the_actual_size(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)  # sparse: nothing allocated yet
    node = await open_image(str(img), fmt="raw")
    try:
        await node.write(0, b"\1" * MiB)
        (layer,) = await chain_info(node)
        assert layer["actual-size"] == os.stat(img).st_blocks * 512 >= MiB
        assert "actual-size" not in node.describe()
    finally:
        await close_chain(node)
    file_node = node.children()[0]
    assert isinstance(file_node, FileNode)
    assert file_node.describe()["filename"] == str(img)  # closed: a describe with I/O would fail
