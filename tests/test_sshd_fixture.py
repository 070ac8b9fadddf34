"""The sshd fixture (tests/sshd.py) itself, judged by the real OpenSSH client and asyncssh."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sshd import PasswordUser, SshServer, fingerprints_of_blob

if shutil.which("ssh") is None:
    pytest.skip("the OpenSSH client (ssh) is not installed", allow_module_level=True)
asyncssh = pytest.importorskip("asyncssh")


def ssh(server: SshServer, *command: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        server.ssh_argv(*command, **kw), capture_output=True, text=True, timeout=30
    )


async def _run_remote(command: str, **options: Any) -> str:
    async with asyncssh.connect(**options) as conn:
        res = await conn.run(command, check=True)
        return str(res.stdout)


def run_remote(server: SshServer, command: str, **kw: Any) -> str:
    return asyncio.run(_run_remote(command, **server.asyncssh_options(**kw)))


def test_key_login(sshd: SshServer) -> None:
    res = ssh(sshd, "id", "-un")
    assert res.returncode == 0, res.stderr + sshd.log_tail()
    assert res.stdout.strip() == "root"


def test_wrong_known_hosts_is_refused(sshd: SshServer) -> None:
    res = ssh(sshd, "true", known_hosts=sshd.wrong_known_hosts)
    assert res.returncode == 255
    assert "Host key verification failed" in res.stderr


def test_fingerprints_match_the_host_key(sshd: SshServer) -> None:
    line = sshd.known_hosts.read_text().split()
    assert line[0] == f"[127.0.0.1]:{sshd.port}"
    assert fingerprints_of_blob(base64.b64decode(line[2])) == (sshd.fp_sha256, sshd.fp_md5)
    assert sshd.wrong_known_hosts.read_text().split()[2] != line[2]
    assert len(sshd.fp_md5.split(":")) == 16 and "=" not in sshd.fp_sha256

    async def server_key() -> Any:
        async with asyncssh.connect(**sshd.asyncssh_options()) as conn:
            return conn.get_server_host_key()

    key = asyncio.run(server_key())
    assert key.get_fingerprint("sha256") == f"SHA256:{sshd.fp_sha256}"
    assert key.get_fingerprint("md5") == f"MD5:{sshd.fp_md5}"


def test_url(sshd: SshServer) -> None:
    assert sshd.url("/srv/a.img") == f"ssh://root@127.0.0.1:{sshd.port}/srv/a.img"
    assert sshd.url(Path("x"), user="bob") == f"ssh://bob@127.0.0.1:{sshd.port}/x"


def test_encrypted_keys_with_passphrase_file(sshd: SshServer, tmp_path: Path) -> None:
    assert sshd.passphrase_file.stat().st_mode & 0o777 == 0o600
    passphrase = sshd.passphrase_file.read_text()
    # OpenSSH itself, the passphrase coming from an askpass helper reading the file
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\nexec cat {sshd.passphrase_file}\n")
    askpass.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    for key in (sshd.identity_enc, sshd.identity_enc_pkcs8):
        res = subprocess.run(
            sshd.ssh_argv("id", "-un", identity=key, batch=False),
            capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert res.returncode == 0 and res.stdout.strip() == "root", res.stderr
    # asyncssh decrypts the PKCS#8 one with cryptography alone
    key = asyncssh.read_private_key(str(sshd.identity_enc_pkcs8), passphrase)
    assert run_remote(sshd, "id -un", client_keys=[key]).strip() == "root"
    with pytest.raises(asyncssh.KeyImportError):
        asyncssh.read_private_key(str(sshd.identity_enc_pkcs8), "wrong")


def test_encrypted_openssh_key_in_asyncssh(sshd: SshServer) -> None:
    """OpenSSH-format encrypted keys (every encrypted ed25519 key) need bcrypt in asyncssh."""
    pytest.importorskip("bcrypt", reason="asyncssh needs bcrypt for encrypted OpenSSH keys")
    key = asyncssh.read_private_key(str(sshd.identity_enc), sshd.passphrase_file.read_text())
    assert run_remote(sshd, "id -un", client_keys=[key]).strip() == "root"


def test_kill_connections_drops_live_ones_only(sshd: SshServer) -> None:
    clients = [
        subprocess.Popen(
            sshd.ssh_argv("echo up; exec sleep 30"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for c in clients:
            assert c.stdout is not None and c.stdout.readline() == "up\n"
        listener = sshd.proc.pid if sshd.proc else None
        assert len(sshd.connection_pids()) == 2
        killed = sshd.kill_connections()
        assert len(killed) >= 4  # two sshd sessions and their two sleeps
        for c in clients:
            assert c.wait(10) == 255  # the connection dropped, long before sleep 30 ends
        assert sshd.running and sshd.proc is not None and sshd.proc.pid == listener
        assert sshd.connection_pids() == []
        res = ssh(sshd, "true")
        assert res.returncode == 0, res.stderr
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
            c.communicate()


def test_stop_start_same_port_same_key(sshd_fn: SshServer) -> None:
    server = sshd_fn
    port, key = server.port, server.host_key.read_bytes()
    live = subprocess.Popen(
        server.ssh_argv("echo up; exec sleep 30"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout is not None and live.stdout.readline() == "up\n"
        t = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - t
        assert live.wait(10) == 255  # stop ends the connections too
        assert not server.running and server.connection_pids() == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((server.host, port), timeout=2).close()
        assert ssh(server, "true").returncode == 255

        t = time.monotonic()
        server.start()
        start_s = time.monotonic() - t
        assert server.port == port and server.host_key.read_bytes() == key
        res = ssh(server, "true")  # StrictHostKeyChecking=yes: the same host key
        assert res.returncode == 0, res.stderr
        assert stop_s < 3 and start_s < 3, (stop_s, start_s)
    finally:
        if live.poll() is None:
            live.kill()
        live.communicate()
    with pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_password_login_and_sftp(sshd: SshServer, ssh_password_user: PasswordUser) -> None:
    user = ssh_password_user
    assert sshd.password_user == user.name and sshd.password_file is not None
    assert sshd.password_file.stat().st_mode & 0o777 == 0o600
    password = sshd.password_file.read_text()
    opts = sshd.asyncssh_options(username=user.name, password=password, client_keys=None)
    folder = user.make_dir()

    async def go() -> tuple[str, bytes]:
        async with asyncssh.connect(**opts) as conn:
            who = (await conn.run("id -un", check=True)).stdout
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(str(folder / "f.bin"), "wb") as f:
                    await f.write(b"hello")
                    await f.fsync()
                async with sftp.open(str(folder / "f.bin"), "rb") as f:
                    data = await f.read()
            return str(who), bytes(data)

    who, data = asyncio.run(go())
    assert who.strip() == user.name and data == b"hello"
    assert (folder / "f.bin").stat().st_uid == user.uid
    # a wrong password is refused
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(_run_remote("true", **{**opts, "password": password + "x"}))


def test_sftp_fsync_supported(sshd: SshServer, tmp_path: Path) -> None:
    target = tmp_path / "disk.img"

    async def go() -> bool:
        async with asyncssh.connect(**sshd.asyncssh_options()) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open(str(target), "wb") as f:
                    await f.write(b"\x01" * 4096, 0)
                    await f.fsync()  # SFTPOpUnsupported unless fsync@openssh.com is offered
                    return True

    assert asyncio.run(go())
    assert target.read_bytes() == b"\x01" * 4096


def test_agent(sshd: SshServer, ssh_agent: Path) -> None:
    assert ssh_agent.is_socket()
    listed = subprocess.run(
        ["ssh-add", "-l"], env={**os.environ, "SSH_AUTH_SOCK": str(ssh_agent)},
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert listed.returncode == 0 and "ED25519" in listed.stdout
    # client_keys=[]: no key file given (and root has no ~/.ssh): only the agent's key
    out = run_remote(sshd, "id -un", client_keys=[], agent_path=str(ssh_agent))
    assert out.strip() == "root"
    with pytest.raises(asyncssh.PermissionDenied):
        run_remote(sshd, "true", client_keys=[], agent_path=None)
