"""The ssh protocol against a real OpenSSH sshd that the fixture starts on 127.0.0.1 with
throwaway keys (tests/sshd.py): URIs, every way to authenticate and every refusal, host-key
checks, images of each format read and written through a mount and judged by qemu-img (which
reads ``ssh://`` itself too), backing files beside their overlay, and faults: a dropped
connection in the middle of fio, and a host that stays away longer than ``timeout=``."""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from blockfs.errors import UsageError
from blockfs.nodes.ssh import SshLocation, fold_properties
from conftest import FULL, blockfs, qemu_img, random_file, run

MiB = 1 << 20


def url(sshd: Any, path: Path | str, user: str | None = None, **props: str) -> str:
    """An ssh:// location of ``path`` on the fixture's server: its plain key and its host
    key's fingerprint unless ``props`` say otherwise (``None``-like "" drops a property)."""
    q = {"identity": str(sshd.identity), "host-key-check": f"sha256:{sshd.fp_sha256}"}
    q.update(props)
    q = {k: v for k, v in q.items() if v}
    query = urllib.parse.urlencode(q, safe="/:")
    who = user or sshd.user
    return f"ssh://{who}@{sshd.host}:{sshd.port}{path}" + (f"?{query}" if query else "")


def qemu_ssh_json(sshd: Any, path: Path, fmt: str) -> str:
    """The image as QEMU's own ssh driver reaches it (agent auth, sha256 host key hash)."""
    digest = base64.b64decode(sshd.fp_sha256 + "=" * (-len(sshd.fp_sha256) % 4)).hex()
    doc = {
        "driver": fmt,
        "file": {
            "driver": "ssh",
            "server": {"host": sshd.host, "port": str(sshd.port)},
            "path": str(path),
            "user": sshd.user,
            "host-key-check": {"mode": "hash", "type": "sha256", "hash": digest},
        },
    }
    return "json:" + json.dumps(doc)


# -- URIs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,host,port,user,path",
    [
        ("ssh://host/srv/vm.qcow2", "host", 22, None, "/srv/vm.qcow2"),
        ("ssh://alice@host:2222/srv/vm.qcow2", "host", 2222, "alice", "/srv/vm.qcow2"),
        ("ssh://[::1]/a.img", "::1", 22, None, "/a.img"),
        ("ssh://bob@[fe80::1]:2200/d/a%20b.img", "fe80::1", 2200, "bob", "/d/a b.img"),
        ("ssh://1.2.3.4/x//y/../z.img", "1.2.3.4", 22, None, "/x/z.img"),
    ],
)
def test_uris_parse_to_their_parts(
    text: str, host: str, port: int, user: str | None, path: str
) -> None:
    loc = SshLocation.parse(text)
    assert (loc.host, loc.port, loc.path) == (host, port, path)
    assert loc.user == (user or os.environ.get("USER") or loc.user)
    assert SshLocation.parse(loc.uri()) == loc  # the canonical form reads back the same


@pytest.mark.parametrize(
    "text,reason",
    [
        ("ssh:///srv/a.img", "no host"),
        ("ssh://host", "no absolute path"),
        ("ssh://host/", "no absolute path"),
        ("ssh://u:secret@host/a.img", "no password in a URI"),
        ("ssh://host:99999/a.img", "not an ssh:// URI"),
        ("ssh://host/a.img?colour=red", "unknown property"),
        ("ssh://host/a.img?timeout=0", "timeout"),
        ("ssh://host/a.img?host-key-check=yes", "host-key-check"),
        ("ssh://host/a.img?identity=", "is empty"),
        ("ssh://host/a.img#frag", "fragment"),
    ],
)
def test_malformed_uris_are_one_line_errors(text: str, reason: str) -> None:
    with pytest.raises(UsageError, match=reason) as err:
        SshLocation.parse(text)
    assert "\n" not in str(err.value)


def test_mount_properties_fold_into_the_uri() -> None:
    folded = fold_properties(
        "ssh://host/srv/vm.qcow2",
        {"user": "alice", "port": "2222", "host-key-check": "md5:aa:bb", "timeout": "5"},
    )
    loc = SshLocation.parse(folded)
    assert (loc.user, loc.port, loc.timeout) == ("alice", 2222, 5.0)
    assert loc.opts["host-key-check"] == "md5:aa:bb"
    with pytest.raises(UsageError, match="port"):
        fold_properties("ssh://host/a", {"port": "http"})


def test_a_backing_uri_found_in_an_image_carries_none_of_its_own_properties() -> None:
    """An image's bytes are hostile: a backing name ``ssh://evil/x?password-file=/etc/shadow``
    must not make the daemon read a secret of its own and send it to a host the image chose."""
    from blockfs.nodes.protocols import resolve_backing

    overlay = "ssh://alice@good:2222/srv/top.qcow2?identity=/home/alice/.ssh/k&timeout=5"
    evil = "ssh://root@evil/x.qcow2?password-file=/etc/shadow&host-key-check=none"
    loc = SshLocation.parse(resolve_backing(overlay, evil))
    assert (loc.host, loc.path, loc.options) == ("evil", "/x.qcow2", ())
    # on the overlay's own server it goes with the overlay's (the user's) properties
    same = "ssh://alice@good:2222/srv/base.qcow2?identity=/etc/shadow"
    loc = SshLocation.parse(resolve_backing(overlay, same))
    assert loc.opts == {"identity": "/home/alice/.ssh/k", "timeout": "5"}
    # and so does a relative name
    loc = SshLocation.parse(resolve_backing(overlay, "base.qcow2"))
    assert loc.path == "/srv/base.qcow2" and loc.opts["identity"] == "/home/alice/.ssh/k"
    # a local image naming a remote backing file: the defaults only
    loc = SshLocation.parse(resolve_backing("/srv/local.qcow2", evil))
    assert loc.options == ()


# -- images through a mount ------------------------------------------------------------------


def _image(tmp: Path, fmt: str) -> tuple[Path, Path]:
    """A local image of ``fmt`` with random data, and its raw reference."""
    raw = random_file(tmp / "ref.raw", 16 * MiB, seed=3)
    img = tmp / f"disk.{fmt}"
    if fmt == "raw":
        run(["cp", str(raw), str(img)])
    else:
        qemu_img("convert", "-O", fmt, str(raw), str(img))
    return img, raw


# raw by default in the fault test below and the bench; all three with BLOCKFS_FULL=1
@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vhdx"] if FULL else ["qcow2", "vhdx"])
def test_images_read_and_written_through_a_mount(
    mount, sshd, ssh_agent, tmp_path: Path, fmt: str
) -> None:
    img, raw = _image(tmp_path, fmt)
    m = mount(f"vm={url(sshd, img)},format={fmt}")
    assert (m / "vm").read_bytes() == raw.read_bytes()
    info = m.info("vm")
    assert info["filename"].startswith(f"ssh://root@{sshd.host}:{sshd.port}/"), info
    qemu_io = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", "-c", "write -P 0xa5 9M 64k",
         str(m / "vm")], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "error" not in qemu_io.stdout.lower()
    with open(m / "vm", "r+b") as f:
        f.seek(12 * MiB + 512)
        f.write(b"\x42" * 4096)
        os.fsync(f.fileno())
    view = tmp_path / "view.raw"
    run(["cp", str(m / "vm"), str(view)])
    m.umount()
    if fmt != "raw":
        qemu_img("check", "-f", fmt, str(img))
    qemu_img("compare", "-f", fmt, "-F", "raw", str(img), str(view))
    # QEMU's own ssh driver, the second judge, reads the same through the same server
    env = dict(os.environ, SSH_AUTH_SOCK=str(ssh_agent))
    res = subprocess.run(
        ["qemu-img", "compare", "-F", "raw", qemu_ssh_json(sshd, img, fmt), str(view)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_an_overlay_reads_its_backing_file_beside_it_on_the_host(
    mount, sshd, tmp_path: Path
) -> None:
    base, raw = _image(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    qemu_io = ["qemu-io", "-c", "write -P 0x11 0 1M", str(top)]
    run(qemu_io)
    m = mount(f"vm={url(sshd, top)},format=qcow2")
    chain = [layer["filename"] for layer in m.chain("vm")]
    assert len(chain) == 2 and all(c.startswith("ssh://") for c in chain), chain
    assert chain[1].split("?")[0].endswith(f"{base}"), chain
    data = (m / "vm").read_bytes()
    assert data[:MiB] == b"\x11" * MiB and data[MiB:] == raw.read_bytes()[MiB:]
    # both layers share one connection: one ssh process
    relays = _relays(m.pid)
    assert len(relays) == 1, relays
    # the daemon killed outright: its relay sees its input end and goes too
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{relays[0]}").exists() and _state(relays[0]) != "Z":
        assert time.monotonic() < deadline, "the relay outlived its daemon"
        time.sleep(0.05)


def _relays(daemon: int) -> list[int]:
    """The processes carrying ssh connections (OpenSSH's ssh, or an asyncssh relay) whose
    parent is ``daemon``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        carrier = b"ssh_relay" in cmdline or b"\0blockfs-ssh-host\0" in cmdline
        if int(stat.rsplit(")", 1)[1].split()[1]) == daemon and carrier:
            found.append(int(entry))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_create_and_info_on_ssh_uris(sshd, tmp_path: Path) -> None:
    target = tmp_path / "made.qcow2"
    blockfs("create", "-f", "qcow2", url(sshd, target), "32M")
    assert json.loads(qemu_img("info", "--output=json", str(target)).stdout)["virtual-size"] == 32 * MiB
    res = blockfs("create", "-f", "qcow2", url(sshd, target), "32M", check=False)
    assert res.returncode != 0 and "exists" in res.stderr and "Traceback" not in res.stderr
    out = blockfs("info", "--output", "json", url(sshd, target)).stdout
    assert json.loads(out)["virtual-size"] == 32 * MiB


# -- authentication and host keys -----------------------------------------------------------


def _info(location: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from conftest import BLOCKFS

    return subprocess.run(
        [*BLOCKFS, "info", location], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, **(env or {})),
    )  # fmt: skip


#: both carriers of the connection: OpenSSH's ssh (the default where installed) and asyncssh
TRANSPORTS = ["openssh", "asyncssh"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_way_to_authenticate(sshd, ssh_keys, ssh_agent, ssh_password_user, tmp_path, transport) -> None:  # type: ignore[no-untyped-def]
    u = functools.partial(url, sshd, transport=transport)
    img, _ = _image(tmp_path, "qcow2")
    home = ssh_password_user.make_dir()
    theirs = home / "disk.qcow2"
    run(["cp", str(img), str(theirs)])
    ssh_password_user.give(theirs)
    cases = {
        "agent": (u(img, identity=""), {"SSH_AUTH_SOCK": str(ssh_agent)}),
        "key": (u(img), {}),
        "key with passphrase": (
            u(img, identity=str(ssh_keys.identity_enc),
                **{"identity-passphrase-file": str(ssh_keys.passphrase_file)}),
            {},
        ),
        "password": (
            u(theirs, user=ssh_password_user.name, identity="",
                **{"password-file": str(ssh_password_user.password_file)}),
            {"SSH_AUTH_SOCK": ""},
        ),
    }
    for what, (loc, env) in cases.items():
        res = _info(loc, env)
        assert res.returncode == 0, (what, res.stderr)
        assert "virtual size: 16 MiB" in res.stdout, (what, res.stdout)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refusals_are_one_line_errors(sshd, ssh_keys, ssh_password_user, tmp_path, transport) -> None:  # type: ignore[no-untyped-def]
    u = functools.partial(url, sshd, transport=transport)
    img, _ = _image(tmp_path, "qcow2")
    wrong_pw = tmp_path / "wrong-password"
    wrong_pw.write_text("not the password\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    no_agent = {"SSH_AUTH_SOCK": "", "HOME": str(tmp_path)}
    cases = [
        ("a wrong password", u(img, user=ssh_password_user.name, identity="",
                                 **{"password-file": str(wrong_pw)}), no_agent,
         "authentication failed (tried: keys in ~/.ssh, password)"),
        ("no way at all", u(img, identity=""), no_agent,
         "authentication failed (tried: keys in ~/.ssh)"),
        ("a wrong passphrase", u(img, identity=str(ssh_keys.identity_enc),
                                   **{"identity-passphrase-file": str(wrong_pw)}), {},
         "identity"),
        ("a wrong fingerprint", u(img, **{"host-key-check": "sha256:" + "A" * 43}), {},
         "host key not trusted"),
        ("a wrong md5", u(img, **{"host-key-check": "md5:" + ":".join(["00"] * 16)}),
         {}, "host key not trusted"),
        ("no file there", u(tmp_path / "nothing.qcow2"), {}, "no such file"),
        ("a FIFO as the password file (no hang)", u(img, identity="",
                                                      **{"password-file": str(fifo)}),
         no_agent, "not a regular file"),
        ("a FIFO as the key", u(img, identity=str(fifo)), {}, "not a regular file"),
    ]  # fmt: skip
    for what, loc, env, text in cases:
        res = _info(loc, env)
        assert res.returncode != 0, what
        err = res.stderr.strip()
        assert text in err and "\n" not in err and "Traceback" not in err, (what, err)
        assert f"{sshd.host}" in err or "no such file" in err, (what, err)


def test_an_ipv6_host_in_brackets(sshd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sshd import _have_ipv6_loopback

    if not _have_ipv6_loopback():
        pytest.skip("the loopback has no ::1")
    img, _ = _image(tmp_path, "qcow2")
    loc = url(sshd, img).replace(f"@{sshd.host}:", "@[::1]:")
    res = _info(loc)
    assert res.returncode == 0 and "virtual size: 16 MiB" in res.stdout, res.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_host_key_checks(sshd, tmp_path: Path, transport: str) -> None:  # type: ignore[no-untyped-def]
    u = functools.partial(url, sshd, transport=transport)
    img, _ = _image(tmp_path, "qcow2")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    known = home / ".ssh" / "known_hosts"
    plain = u(img, **{"host-key-check": ""})  # the default: known_hosts
    # unknown host: refused
    res = _info(plain, {"HOME": str(home)})
    assert res.returncode != 0 and "host key not trusted" in res.stderr, res.stderr
    # a changed key: refused
    known.write_text(Path(sshd.wrong_known_hosts).read_text())
    res = _info(plain, {"HOME": str(home)})
    assert res.returncode != 0 and "host key not trusted" in res.stderr, res.stderr
    # the right one: accepted
    known.write_text(Path(sshd.known_hosts).read_text())
    assert _info(plain, {"HOME": str(home)}).returncode == 0
    # fingerprints, either hash
    assert _info(u(img, **{"host-key-check": f"md5:{sshd.fp_md5}"})).returncode == 0
    # none: accepted, with a warning
    res = _info(u(img, **{"host-key-check": "none"}), {"HOME": str(tmp_path)})
    assert res.returncode == 0


# -- faults ------------------------------------------------------------------------------------


def test_a_dropped_connection_is_invisible_and_a_long_outage_is_eio(
    mount, sshd_fn, tmp_path: Path
) -> None:
    """fio verifies while every connection of the server is killed (not the listener): it
    sees no error. Then the server goes away for longer than timeout=: a read fails with EIO
    in time, the mount stays up, and once the server is back everything reads as written."""
    sshd = sshd_fn
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(64 * MiB))
    m = mount(f"vm={url(sshd, img, timeout='4')},format=raw")
    fio = subprocess.Popen(
        ["fio", "--name=ssh", f"--filename={m / 'vm'}", "--rw=randwrite", "--bs=64k",
         "--size=48M", "--ioengine=libaio", "--iodepth=8", "--direct=1",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    time.sleep(1.0)
    killed = sshd.kill_connections()
    assert killed, "no connection to drop"
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0 and "err= 0" in out, out
    before = (m / "vm").read_bytes()
    sshd.stop()
    t0 = time.monotonic()
    fd = os.open(m / "vm", os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as err:
            os.pread(fd, 4096, 8 * MiB)
        took = time.monotonic() - t0
        assert err.value.errno == 5 and took < 4 + 6, (err.value, took)
        assert (m.path / ".control" / "pid").exists()  # the mount is still up
        sshd.start()
        assert os.pread(fd, 4096, 8 * MiB) == before[8 * MiB : 8 * MiB + 4096]
    finally:
        os.close(fd)
    assert (m / "vm").read_bytes() == before
    m.umount()
    assert img.read_bytes() == before


# -- the FUSE reader threads' path -----------------------------------------------------------


def test_reader_threads_send_a_raw_images_requests_themselves(mount, sshd_fn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A raw image on an ssh host is served by the FUSE reader threads, which send its reads
    and writes to the SFTP session themselves (1 MiB ones in parts): fio verifies a pass of
    mixed sizes, the stats say the threads carried the requests, and the image is what was
    read back. Then every connection is killed in the middle of a verifying read pass: the
    requests the dead connection held go back to the event loop and are sent again there,
    and fio sees no error."""
    sshd = sshd_fn
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(32 * MiB))
    m = mount(f"vm={url(sshd, img, timeout='10')},format=raw")
    assert "FUSE requests: 1 reader thread " in m.log_text()
    job = ["fio", "--name=ssh", f"--filename={m / 'vm'}", "--size=24M", "--ioengine=libaio",
           "--direct=1", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
           "--rw=randwrite", "--bsrange=4k-1m", "--iodepth=8"]  # fmt: skip
    out = run([*job, "--do_verify=1"], cwd=tmp_path).stdout
    assert "err= 0" in out, out
    direct = m.stats("vm")["direct"]
    assert direct["rd_operations"] > 0 and direct["wr_operations"] > 0, direct
    fio = subprocess.Popen(
        [*job, "--verify_only"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=tmp_path,
    )  # fmt: skip
    time.sleep(0.5)
    assert sshd.kill_connections(), "no connection to drop"
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0 and "err= 0" in out, out
    view = tmp_path / "view.raw"
    run(["cp", str(m / "vm"), str(view)])
    m.umount()
    assert img.read_bytes() == view.read_bytes()
    assert "Traceback" not in m.log_text()


def test_a_queue_of_requests_leaves_in_few_sends(mount, sshd, tmp_path: Path) -> None:
    """4 KiB random reads at queue depth 16: the reader thread holds each SFTP request back
    while more are queued and sends them together, so far fewer pipe writes than requests
    (the log's count at unmount); fio verifies the data read."""
    img = tmp_path / "disk.raw"
    random_file(img, 16 * MiB, seed=21)
    m = mount(f"vm={url(sshd, img)},format=raw")
    job = ["fio", "--name=q", f"--filename={m / 'vm'}", "--size=16M", "--ioengine=libaio",
           "--direct=1", "--bs=4k", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1"]  # fmt: skip
    out = run([*job, "--rw=randwrite", "--do_verify=0"], cwd=tmp_path).stdout
    assert "err= 0" in out, out
    out = run([*job, "--rw=randread", "--verify_only", "--number_ios=4096"], cwd=tmp_path).stdout
    assert "err= 0" in out, out
    m.umount()
    line = next(x for x in m.log_text().splitlines() if "requests to remote images went" in x)
    requests, sends = (int(w) for w in line.split() if w.isdigit())
    assert requests >= 8192 and requests >= 2 * sends, line


def test_a_mount_of_local_and_remote_images_serves_both_at_once(
    mount, sshd, tmp_path: Path
) -> None:
    """A local raw image beside a raw image on an ssh host: two reader threads, each of
    which holds back the remote requests and sends them before anything else; fio verifies
    a pass of mixed sizes on both files at once, and each image is what was read back."""
    local, far = tmp_path / "local.raw", tmp_path / "far.raw"
    for img in (local, far):
        img.write_bytes(bytes(16 * MiB))
    m = mount(f"a={local},format=raw", f"b={url(sshd, far)},format=raw")
    assert "FUSE requests: 2 reader threads" in m.log_text()
    jobs = []
    for name, seed in (("a", 1), ("b", 2)):
        job = ["fio", f"--name={name}", f"--filename={m / name}", "--size=12M",
               "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bsrange=4k-256k",
               "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
               f"--randseed={seed}"]  # fmt: skip
        jobs.append(subprocess.Popen(
            job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
        ))  # fmt: skip
    for fio in jobs:
        out, _ = fio.communicate(timeout=180)
        assert fio.returncode == 0 and "err= 0" in out, out
    for name, img in (("a", local), ("b", far)):
        view = tmp_path / f"view-{name}"
        run(["cp", str(m / name), str(view)])
        assert view.read_bytes() == img.read_bytes(), name
    m.umount()
    assert "Traceback" not in m.log_text()


# -- jobs with ssh targets -----------------------------------------------------------------


def test_backup_and_mirror_to_ssh_targets(mount, sshd, tmp_path: Path) -> None:
    from conftest import ctl, start, status, wait_ready, wait_state

    raw = random_file(tmp_path / "src.raw", 32 * MiB, seed=8)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-O", "qcow2", str(raw), str(src))
    m = mount(f"vm={src},format=qcow2")
    far = tmp_path / "far"
    far.mkdir()
    backup = far / "backup.qcow2"
    assert start(m, f"device=vm target={url(sshd, backup)} id=bk", "backup") == "bk"
    s = wait_state(m, "bk", ("concluded",))
    assert s["error"] is None, s
    qemu_img("compare", "-F", "raw", str(backup), str(raw))
    assert sorted(p.name for p in far.iterdir()) == ["backup.qcow2"]  # no temporary left
    # a taken name is refused at once
    fd = os.open(m.path / ".control" / "jobs" / "backup", os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            os.write(fd, f"device=vm target={url(sshd, backup)} id=again\n".encode())
        assert err.value.errno == 17 and "exists already" in os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    moved = far / "moved.qcow2"
    assert start(m, f"device=vm target={url(sshd, moved)} id=mr", "mirror") == "mr"
    wait_ready(m, "mr")
    ctl(m, "mr", "complete")
    s = wait_state(m, "mr", ("concluded",))
    assert s["error"] is None and status(m, "mr")["target-state"].startswith("switched"), s
    assert m.info("vm")["filename"].startswith("ssh://"), m.info("vm")
    with open(m / "vm", "r+b") as f:  # the disk now lives on the remote side
        f.seek(5 * MiB)
        f.write(b"\x66" * MiB)
    final = tmp_path / "final.raw"
    run(["cp", str(m / "vm"), str(final)])
    m.umount()
    qemu_img("check", str(moved))
    qemu_img("compare", "-F", "raw", str(moved), str(final))
