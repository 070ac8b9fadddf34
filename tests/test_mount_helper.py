"""mount(8)'s way in: ``mount -t fuse.blockfs``, fstab lines and ``umount`` (cli/mounthelper.py).

First the translation of mount's words as pure functions, then the helpers' refusals (one line,
mount(8)'s exit codes), then real mounts through util-linux, judged by qemu-img: the data
written through the mount is in the image, and the image is clean, as soon as ``umount``
returns. The helpers are linked into /sbin (where mount(8) looks) by a fixture when they are
not there already, and the links it made are removed at the end.
"""

from __future__ import annotations

import argparse
import configparser
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockfs.cli import main as cli_main
from blockfs.cli.mounthelper import (
    FLAG_OPTIONS,
    MOUNT_PROG,
    NO_FLAGS,
    NO_OP_OPTIONS,
    REFUSED_OPTIONS,
    UMOUNT_PROG,
    MountFlag,
    MountRequest,
    mount_main,
    split_options,
    translate,
    umount_main,
)
from blockfs.errors import UsageError
from conftest import BLOCKFS, REPO, force_unmount, have_fuse, is_mounted, qemu_img, wait_gone

BIN = Path(sys.executable).parent
#: where mount(8) looks for helpers: libmount searches /sbin:/sbin/fs.d:/sbin/fs only
SBIN = Path("/sbin")
HELPERS = (MOUNT_PROG, UMOUNT_PROG)
#: held shared by every test process using the links, exclusively to make or remove them
LOCK = Path(tempfile.gettempdir()) / "blockfs-mount-helpers.lock"
#: the links the tests made (and so may remove), one name a line
MADE = Path(tempfile.gettempdir()) / "blockfs-mount-helpers.made-by-tests"
EXAMPLES = REPO / "examples"
UTAB = Path("/run/mount/utab")


# -- translation: pure functions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("rw", ["rw"]),
        ("ro,allow_other,uid=0", ["ro", "allow_other", "uid=0"]),
        ('image="d0=/a.img,format=raw",ro', ["image=d0=/a.img,format=raw", "ro"]),
        ('image="d0=/a,,b.img",rw', ["image=d0=/a,,b.img", "rw"]),
        (",,ro,,", ["ro"]),
        ("", []),
    ],
)
def test_split_options_keeps_quoted_commas(text: str, items: list[str]) -> None:
    assert split_options(text) == items


def test_split_options_refuses_an_open_quote() -> None:
    with pytest.raises(UsageError, match="double quote is not closed"):
        split_options('image="d0=/a,ro')


M = "/mnt/x"


@pytest.mark.parametrize(
    ("source", "options", "args", "flags"),
    [
        ("/srv/a.img", ["rw"], [M, "--", "/srv/a.img"], NO_FLAGS),
        (
            "d0=/srv/a.qcow2,format=qcow2",
            ["ro"],
            ["--read-only", M, "--", "d0=/srv/a.qcow2,format=qcow2"],
            NO_FLAGS,
        ),
        ("d0=/a", ["ro", "rw"], [M, "--", "d0=/a"], NO_FLAGS),
        (
            "none",
            split_options('rw,image=d0=/a,image="d1=/b,,c.img,format=raw",allow_other'),
            ["--allow-other", M, "--", "d0=/a", "d1=/b,,c.img,format=raw"],
            NO_FLAGS,
        ),
        ("blockfs", ["image=/srv/x.img"], [M, "--", "/srv/x.img"], NO_FLAGS),
        (
            "d0=/a",
            ["uid=0", "gid=root", "mode=0640", "log=/var/log/b.log"],
            ["--uid=0", "--gid=0", "--mode=640", "--log=/var/log/b.log", M, "--", "d0=/a"],
            NO_FLAGS,
        ),
        (
            "d0=/a",
            ["noexec", "noatime", "nodiratime", "strictatime"],
            [M, "--", "d0=/a"],
            MountFlag.NOEXEC | MountFlag.NOATIME | MountFlag.NODIRATIME | MountFlag.STRICTATIME,
        ),
        (
            "d0=/a",
            [*NO_OP_OPTIONS, "x-systemd.automount", "x-systemd.requires=a.service", "comment=x"],
            [M, "--", "d0=/a"],
            NO_FLAGS,
        ),
    ],
)
def test_translate(source: str, options: list[str], args: list[str], flags: MountFlag) -> None:
    req = translate(source, M, options)
    if source != "blockfs":  # the mount shows its source (mount -a then sees it mounted)
        at = args.index(M)
        args = [*args[:at], f"--fsname={source}", *args[at:]]
    assert req.blockfs_args() == args
    assert req.flags == flags


def test_translate_is_sloppy_only_when_asked() -> None:
    with pytest.raises(UsageError, match="unknown option 'bogus'"):
        translate("d0=/a", M, ["bogus"])
    req = translate("d0=/a", M, ["bogus", "sync", "ro"], sloppy=True)
    assert req == MountRequest(mountpoint=M, images=("d0=/a",), read_only=True, source="d0=/a")


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("none", ["rw"], "no image"),
        ("d0=/a", ["bogus"], "unknown option 'bogus'"),
        *(("d0=/a", [opt], f"option '{opt}' is not supported") for opt in REFUSED_OPTIONS),
        ("d0=/a", ["image="], "no image spec"),
        ("d0=/a", ["image=d0=/b"], "two images named 'd0'"),
        ("d0=/a", ["image=d1=/b,colour=red"], "unknown option 'colour'"),
        ("d0=/a", ["mode=999"], "mode="),
        ("d0=/a", ["uid=-1"], "uid="),
        ("d0=/a", ["uid=no-such-user-here"], "no such user"),
        ("d0=/a", ["gid=no-such-group-here"], "no such group"),
        ("d0=/a", ["log="], "no file name"),
    ],
)
def test_translate_refuses(source: str, options: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        translate(source, M, options)


# -- refusals of the helpers, in this process -------------------------------------------------


def _one_line(err: str, prog: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 65536)
    return img


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["none", "{mnt}", "-o", "rw"], "no image"),
        (["{img}", "{mnt}", "-o", "rw,bogus"], "unknown option 'bogus'"),
        (["{img}", "{mnt}", "-o", "sync"], "option 'sync' is not supported"),
        (["{img}", "{mnt}", "-o", 'image="d1=/b'], "double quote is not closed"),
        (["{img}", "{mnt}", "-N", "1"], "namespace"),
        (["{img}", "{mnt}", "-t", "fuse.sshfs"], "fuse.blockfs only"),
        (["{img}"], "required"),
        (["{img}", "{mnt}", "extra"], "unrecognized arguments"),
    ],
)
def test_mount_helper_refuses_a_bad_call_with_exit_1(
    argv: list[str], message: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = mount_main([a.format(img=image, mnt=mnt) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert message in _one_line(err, MOUNT_PROG)
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("image_name", "mnt_name", "message"),
    [
        ("missing.img", "mnt", "missing.img"),
        ("a.img", "no-such-dir", "no such directory"),
        ("a.img", "a.img", "not a directory"),
    ],
)
def test_mount_helper_reports_a_failed_mount_with_exit_32(
    image_name: str,
    mnt_name: str,
    message: str,
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "mnt").mkdir()
    code = mount_main([str(tmp_path / image_name), str(tmp_path / mnt_name)])
    out, err = capsys.readouterr()
    assert code == 32 and out == ""
    assert message in _one_line(err, MOUNT_PROG)
    assert not is_mounted(tmp_path / "mnt")


def test_mount_helper_fake_and_sloppy_check_and_mount_nothing(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = mount_main([f"d0={image}", str(mnt), "-f", "-s", "-v", "-n", "-o", "ro,bogus,sync"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    want = f"blockfs mount --read-only --fsname=d0={image} {mnt} -- d0={image}"
    assert out == f"{MOUNT_PROG}: {want}\n"
    assert not is_mounted(mnt)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        ([], 1, "required"),
        (["{mnt}", "-N", "1"], 1, "namespace"),
        (["{mnt}", "-t", "fuse.sshfs"], 1, "fuse.blockfs only"),
        (["{mnt}"], 32, "not mounted"),
        (["{mnt}/nope"], 32, "no such directory"),
    ],
)
def test_umount_helper_refuses(
    argv: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert umount_main([a.format(mnt=tmp_path) for a in argv]) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert message in _one_line(err, UMOUNT_PROG)


# -- help -------------------------------------------------------------------------------------


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices[command]
            assert isinstance(found, argparse.ArgumentParser)
            return found
    raise AssertionError(f"no command {command}")


@pytest.mark.parametrize("command", [None, "mount", "umount"])
def test_blockfs_help_lists_every_option_with_an_example(command: str | None) -> None:
    parser = cli_main.build_parser()
    if command is not None:
        parser = _subparser(parser, command)
    text = parser.format_help()
    assert "examples:" in text
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for opt in action.option_strings:
            assert opt in text
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"{action.dest} has no help"


def test_helpers_help_lists_every_option() -> None:
    for prog in HELPERS:
        res = subprocess.run([BIN / prog, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "examples:" in res.stdout, res.stderr
    text = subprocess.run([BIN / MOUNT_PROG, "--help"], capture_output=True, text=True).stdout
    words = ["image=", "ro,", "rw", "allow_other", "uid=", "gid=", "mode=", "log="]
    for word in [*words, *FLAG_OPTIONS, *NO_OP_OPTIONS, *REFUSED_OPTIONS]:
        assert re.search(rf"(^|[\s,(]){re.escape(word)}", text), word


# -- the examples -----------------------------------------------------------------------------


def _fstab_fields(line: str) -> list[str]:
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f) for f in line.split()]


def _check_fstab_line(line: str) -> MountRequest:
    source, mnt, fstype, options, freq, passno = _fstab_fields(line)
    assert fstype == "fuse.blockfs" and (freq, passno) == ("0", "0")
    return translate(source, mnt, split_options(options))


def test_example_fstab_lines_translate() -> None:
    lines = [
        line
        for line in (EXAMPLES / "fstab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    requests = [_check_fstab_line(line) for line in lines]
    assert len(requests) == 4
    assert requests[3].images == ("scratch=/srv/scratch disks/scratch.img,format=raw",)


def test_example_mount_unit_is_its_fstab_line() -> None:
    text = (EXAMPLES / "blockfs-disk.mount").read_text()
    fstab_line = next(line.lstrip("# ") for line in text.splitlines() if "  fuse.blockfs  " in line)
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    section = unit["Mount"]
    assert section["Type"] == "fuse.blockfs"
    from_unit = translate(section["What"], section["Where"], split_options(section["Options"]))
    from_fstab = _check_fstab_line(fstab_line)
    assert from_unit == from_fstab
    assert from_unit.images == (
        "disk0=/srv/vm/disk0.qcow2,format=qcow2",
        "data=/srv/vm/data.img,format=raw",
    )


def test_example_mount_unit_passes_systemd_analyze_verify() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    res = subprocess.run(
        [tool, "verify", str(EXAMPLES / "blockfs-disk.mount")], capture_output=True, text=True
    )
    assert res.returncode == 0 and "blockfs-disk.mount" not in res.stderr, res.stderr


# -- real mounts through util-linux ------------------------------------------------------------


@pytest.fixture(scope="session")
def helpers_in_sbin() -> Iterator[None]:
    """The helpers where mount(8) finds them: linked to this venv's scripts unless already
    there; the links made here are removed by the last test process that used them."""
    if not have_fuse():
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    for prog in HELPERS:
        assert (BIN / prog).exists(), f"{BIN / prog} is missing: pip install -e '.[test]'"
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    foreign = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for prog in HELPERS:
            link = SBIN / prog
            if not os.path.lexists(link):
                link.symlink_to(BIN / prog)
                with MADE.open("a") as f:
                    f.write(f"{prog}\n")
            elif os.path.realpath(link) != os.path.realpath(BIN / prog):
                foreign = f"{link} is another blockfs's ({os.path.realpath(link)})"
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    if foreign is not None:
        os.close(fd)
        pytest.skip(foreign)
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another test process still mounts with them; the last one cleans up
        else:
            made = MADE.read_text().split() if MADE.exists() else []
            for prog in made:
                link = SBIN / prog
                if os.path.islink(link) and os.readlink(link) == str(BIN / prog):
                    link.unlink()
            MADE.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _daemon_pid(mnt: Path) -> int | None:
    try:
        return int((mnt / ".control" / "pid").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def mountpoint(tmp_path: Path, helpers_in_sbin: None) -> Iterator[Callable[[str], Path]]:
    """``mountpoint("name")`` makes a directory to mount on; whatever is mounted on one at
    teardown is unmounted (umount, then blockfs umount, then a lazy fusermount3), and a
    daemon's log under tmp_path must hold no traceback."""
    made: list[Path] = []

    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in made:
        if not is_mounted(path):
            continue
        pid = _daemon_pid(path)
        for cmd in (["umount", str(path)], [*BLOCKFS, "umount", str(path)]):
            if is_mounted(path):
                subprocess.run(cmd, capture_output=True, timeout=120)
        force_unmount(path)
        if pid is not None and not wait_gone(pid):
            os.kill(pid, signal.SIGKILL)
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert "Traceback" not in text, f"daemon log {log} holds a traceback:\n{text}"


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=120)


def _utab_entries(mnt: Path) -> list[str]:
    """libmount's lines for ``mnt`` in /run/mount/utab."""
    try:
        lines = UTAB.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if f" TARGET={os.path.realpath(mnt)} " in line]


def _umount(mnt: Path) -> None:
    pid = _daemon_pid(mnt)
    assert pid is not None
    # The mount helper listed the mount in utab: umount(8) then runs umount.fuse.blockfs.
    [entry] = _utab_entries(mnt)
    assert "x-blockfs.umount" in entry
    res = subprocess.run(["umount", "-v", str(mnt)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{UMOUNT_PROG}: blockfs umount {mnt}" in res.stdout
    assert not is_mounted(mnt)
    # umount.fuse.blockfs waited: the daemon has flushed, closed every image and exited.
    assert _exited(pid), f"daemon {pid} still runs after umount returned"
    assert _utab_entries(mnt) == []


def _exited(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text.rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped by its new parent


def _mount_flags(mnt: Path) -> tuple[str, set[str]]:
    """The file system type and the per-mount options of ``mnt`` (/proc/self/mountinfo)."""
    target = os.path.realpath(mnt)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            return fields[fields.index("-") + 1], set(fields[5].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def _write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def test_mount_t_fuse_blockfs_writes_reach_the_images_before_umount_returns(
    tmp_path: Path, mountpoint: Callable[[str], Path]
) -> None:
    qcow2, raw = tmp_path / "d0.qcow2", tmp_path / "r1.raw"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "16M")
    qemu_img("create", "-q", "-f", "raw", str(raw), "8M")
    ref_qcow2, ref_raw = tmp_path / "d0.ref", tmp_path / "r1.ref"
    ref_qcow2.write_bytes(bytes(16 << 20))
    ref_raw.write_bytes(bytes(8 << 20))
    mnt = mountpoint("mnt")
    # No userspace option (_netdev, x-*): the utab entry is the helper's alone.
    opts = f'noexec,noatime,image="r1={raw},format=raw",log={tmp_path / "mnt.log"}'
    res = _mount("-t", "fuse.blockfs", f"d0={qcow2},format=qcow2", str(mnt), "-o", opts)
    assert res.returncode == 0, res.stderr
    fstype, flags = _mount_flags(mnt)
    assert fstype == "fuse.blockfs"
    assert {"rw", "noexec", "noatime", "nosuid", "nodev"} <= flags
    assert sorted(os.listdir(mnt)) == [".control", "d0", "r1"]

    for offset, size, seed in ((0, 4096, 1), (3 << 20, 1 << 20, 2), ((16 << 20) - 512, 512, 3)):
        data = bytes([seed]) * size
        _write(mnt / "d0", offset, data)
        _write(ref_qcow2, offset, data)
    data = os.urandom(65536)
    _write(mnt / "r1", 12345, data)
    _write(ref_raw, 12345, data)
    _umount(mnt)

    check = qemu_img("check", "-f", "qcow2", str(qcow2))
    assert "No errors were found" in check.stdout
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), str(ref_qcow2))
    qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(raw), str(ref_raw))


def test_mount_a_with_an_fstab_mounts_every_auto_line(
    tmp_path: Path, mountpoint: Callable[[str], Path]
) -> None:
    qcow2 = tmp_path / "d0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "16M")
    odd = tmp_path / "a b,c.raw"  # a space (\040 in fstab) and a comma (,, in a spec)
    odd.write_bytes(bytes(1 << 20))
    plain = tmp_path / "r1.raw"
    plain.write_bytes(bytes(1 << 20))
    ro, rw, manual = mountpoint("ro"), mountpoint("rw"), mountpoint("manual")
    odd_spec = str(odd).replace(" ", "\\040").replace(",", ",,")
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# blockfs lines for mount -a -T\n"
        f"d0={qcow2},format=qcow2  {ro}  fuse.blockfs  ro,nofail,log={tmp_path / 'ro.log'}  0 0\n"
        f'none  {rw}  fuse.blockfs  image="odd={odd_spec},format=raw",image=r1={plain},'
        f"uid=daemon,gid=0,mode=640,log={tmp_path / 'rw.log'},_netdev,"
        "x-systemd.requires=blockfs-test.service  0 0\n"
        f"{plain}  {manual}  fuse.blockfs  noauto  0 0\n"
    )
    res = _mount("-a", "-T", str(fstab))
    assert res.returncode == 0, res.stderr
    assert is_mounted(ro) and is_mounted(rw) and not is_mounted(manual)
    # again: each line is seen mounted (the mount shows the line's source), nothing is done
    res = _mount("-a", "-T", str(fstab))
    assert res.returncode == 0, res.stderr

    assert "ro" in _mount_flags(ro)[1]
    with pytest.raises(OSError) as exc:
        _write(ro / "d0", 0, b"x")
    assert exc.value.errno == errno.EROFS
    st = (rw / "odd").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1, 0, 0o640)
    _write(rw / "odd", 4096, b"through fstab")
    _umount(rw)
    _umount(ro)
    assert odd.read_bytes()[4096 : 4096 + 13] == b"through fstab"
    qemu_img("check", "-q", "-f", "qcow2", str(qcow2))


@pytest.mark.parametrize(
    ("source", "options", "code", "message"),
    [
        ("none", "rw", 1, "no image"),
        ("{img}", "bogus", 1, "unknown option 'bogus'"),
        ("{tmp}/missing.img", "rw", 32, "missing.img"),
    ],
)
def test_mount_refusals_come_through_mount_8(
    source: str,
    options: str,
    code: int,
    message: str,
    image: Path,
    tmp_path: Path,
    mountpoint: Callable[[str], Path],
) -> None:
    mnt = mountpoint("mnt")
    source = source.format(img=image, tmp=tmp_path)
    res = _mount("-t", "fuse.blockfs", source, str(mnt), "-o", options)
    assert res.returncode == code, res.stderr
    assert message in _one_line(res.stderr, MOUNT_PROG)
    assert not is_mounted(mnt)
