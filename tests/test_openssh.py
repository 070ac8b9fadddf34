"""OpenSSH's ssh as the ssh node's transport (blockfs.nodes.openssh): what its command line
may and may not carry, and the askpass helper ssh runs. The logins, refusals and host key
checks against a real sshd are in test_ssh.py (both transports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockfs.nodes import openssh

HELPER = str(Path(sys.executable).with_name(openssh.HELPER))


def _launch(tmp_path: Path, **opts: str) -> openssh.Launch:
    return openssh.command("host%1", 2222, "alice", opts, 12.0, "/usr/bin/ssh", HELPER)


def test_no_secret_on_the_command_line(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not really a key\n")
    secret = tmp_path / "pw"
    secret.write_text("hunter2-secret\n")
    launch = _launch(tmp_path, identity=str(key), **{"identity-passphrase-file": str(secret),
                                                     "password-file": str(secret)})  # fmt: skip
    words = " ".join(launch.argv) + " " + " ".join(launch.env.values())
    assert "hunter2" not in words
    assert launch.env["SSH_ASKPASS"] == HELPER and launch.env["SSH_ASKPASS_REQUIRE"] == "force"
    assert "BatchMode=no" in launch.argv and "IdentitiesOnly=yes" in launch.argv
    # no ssh_config is read (a ProxyCommand there would run), no known_hosts file written
    assert launch.argv[1:3] == ["-F", "/dev/null"] and "UpdateHostKeys=no" in launch.argv
    # the destination is fixed and the host an option: a host never reads as an option, and
    # its % is not a token
    assert launch.argv[-4:] == ["-s", "--", "blockfs-ssh-host", "sftp"]
    assert "HostName=host%%1" in launch.argv
    assert launch.tried == [f"key {key}", "password"]
    assert launch.key_check is not None and launch.key_check[-1] == str(key)


def test_without_secrets_ssh_never_asks(tmp_path: Path) -> None:
    launch = _launch(tmp_path, **{"host-key-check": "sha256:abc"})
    assert "BatchMode=yes" in launch.argv and "SSH_ASKPASS" not in launch.env
    assert "PasswordAuthentication=no" in launch.argv
    assert "UserKnownHostsFile=/dev/null" in launch.argv  # only the pin vouches for the key
    assert any(a.startswith("KnownHostsCommand=" + HELPER) for a in launch.argv)


def test_unusable_files_are_refused_before_ssh_starts(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(openssh.SecretError, match="not a regular file"):
        _launch(tmp_path, identity=str(fifo))
    with pytest.raises(openssh.SecretError, match="No such file"):
        _launch(tmp_path, **{"password-file": str(tmp_path / "none")})
    big = tmp_path / "big"
    big.write_bytes(b"x" * (openssh.MAX_SECRET_FILE + 1))
    with pytest.raises(openssh.SecretError, match="larger than"):
        _launch(tmp_path, **{"password-file": str(big)})


def test_the_openssh_version_is_read_from_ssh_v() -> None:
    assert openssh.openssh_version(b"OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15") == (9, 2)
    assert openssh.openssh_version(b"OpenSSH_8.4p1 Debian-5") < openssh.MIN_VERSION
    assert openssh.openssh_version(b"Sun_SSH_1.1.4") == (0, 0)


def _helper(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELPER, *args], capture_output=True, text=True, timeout=20,
                          env=dict(os.environ, **env))  # fmt: skip


def test_askpass_answers_only_what_it_was_given(tmp_path: Path) -> None:
    if not os.access(HELPER, os.X_OK):
        pytest.skip(f"{HELPER} is not installed (make venv installs it)")
    phrase, pw = tmp_path / "phrase", tmp_path / "pw"
    phrase.write_text("the phrase\nsecond line ignored\n")
    pw.write_text("the password\n")
    env = {"BLOCKFS_SSH_PASSPHRASE_FILE": str(phrase), "BLOCKFS_SSH_PASSWORD_FILE": str(pw)}
    res = _helper("Enter passphrase for key '/k': ", **env)
    assert res.returncode == 0 and res.stdout == "the phrase\n"
    res = _helper("alice@host's password: ", **env)
    assert res.returncode == 0 and res.stdout == "the password\n"
    # a question it was not given an answer for (a host key to confirm): no
    res = _helper("Are you sure you want to continue connecting (yes/no/[fingerprint])? ", **env)
    assert res.returncode != 0 and res.stdout == ""
    res = _helper("alice@host's password: ", BLOCKFS_SSH_PASSWORD_FILE="")
    assert res.returncode != 0 and res.stdout == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = _helper("alice@host's password: ", BLOCKFS_SSH_PASSWORD_FILE=str(fifo))  # no hang
    assert res.returncode != 0 and "not a regular file" in res.stderr


def test_known_host_vouches_for_the_pinned_key_only() -> None:
    if not os.access(HELPER, os.X_OK):
        pytest.skip(f"{HELPER} is not installed (make venv installs it)")
    args = ("--known-host", "[h]:2222", "ssh-ed25519", "AAAAkey")
    res = _helper(*args, "SHA256:Abc123", BLOCKFS_SSH_HOST_KEY="Abc123")
    assert res.returncode == 0 and res.stdout == "[h]:2222 ssh-ed25519 AAAAkey\n"
    res = _helper(*args, "SHA256:abc123", BLOCKFS_SSH_HOST_KEY="Abc123")  # base64: case counts
    assert res.returncode == 0 and res.stdout == ""
    res = _helper(*args, "MD5:AA:bb", BLOCKFS_SSH_HOST_KEY="aa:BB")  # hex: it does not
    assert res.stdout == "[h]:2222 ssh-ed25519 AAAAkey\n"
    res = _helper("--known-host", "[h]:2222", "", "", "", BLOCKFS_SSH_HOST_KEY="Abc123")
    assert res.returncode == 0 and res.stdout == ""
