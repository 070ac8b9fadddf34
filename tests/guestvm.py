"""A throwaway QEMU guest for tests and examples: boot, run one shell script, power off.

What lives here:

* `GuestKit` finds (or fetches once) a Debian cloud kernel and the virtio modules it needs, caches
  them under a directory keyed by the kernel package and version, and boots guests with them.
  The kernel comes from the Debian package via ``apt-get download`` + ``dpkg -x``; nothing is
  installed into /boot and nothing on the host changes except the cache directory.
* The initramfs is built per boot, in Python (cpio "newc", gzip), from ``busybox-static`` plus the
  modules; its ``/init`` loads the modules, runs the script, prints ``GUEST-EXIT: <rc>`` on the serial
  console and powers off.
* `PatternWorkload`, `Ext2Workload`, `PointInTimeWorkload` and `SwitchOverWorkload` are the guest
  workloads the VM tests and ``examples/vm.sh`` share: each builds the guest script and checks the
  disk image afterwards from the host. `PointInTimeWorkload` pauses twice for the host (see
  `RunningGuest`), so a job can start between its BEFORE and AFTER markers; `SwitchOverWorkload`
  pauses before and after its DURING markers, so a job can copy the disk while they are written
  and move it elsewhere before its AFTER markers.

What must not live here: anything about blockfs itself (mounting, images). This module drives a
guest on whatever files it is given, so a failure it reports is about the disk it was handed.

The guest never has a network (``-nodefaults -nic none``) and runs under TCG only: KVM may exist
but fail inside the machines this runs on.

Host packages: ``qemu-system-x86`` (with its ``seabios`` dependency), ``busybox-static``,
``e2fsprogs`` (host-side checks) and apt's package lists (``apt-get update``) for the first fetch.

Command line (for examples)::

    python -m tests.guestvm prepare
    python -m tests.guestvm run --workload ext2 --disk IMG[:cache=none] [--verify IMG]
    python -m tests.guestvm run --workload markers --disk IMG --handshake   # phases on stdin/out

`GuestKit.run` boots and waits; `GuestKit.start` returns a `RunningGuest` at once, so the host can
act while the guest runs: the guest script calls ``host_phase NAME`` (`HOST_PHASE_SH`), the host
sees it with `RunningGuest.expect` and lets it go on with `RunningGuest.send`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import io
import logging
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "vm"

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

#: What the guest needs to see its disks, in load order: each one's dependencies come first.
#: Modules built into the kernel are skipped; the order is re-derived from each module's
#: ``depends=`` so a kernel that splits them differently still loads.
VIRTIO_BLK_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)

#: The guest prints this line (and nothing else starts with it) once its script has returned.
EXIT_MARKER = "GUEST-EXIT: "
#: Lines a script prints as ``GUEST-RESULT: key=value`` end up in `GuestResult.results`.
RESULT_MARKER = "GUEST-RESULT: "
BEGIN_MARKER = "GUEST-BEGIN"

#: Shell functions a guest script includes to pause for the host: ``host_phase NAME`` syncs,
#: prints ``GUEST-RESULT: phase=NAME`` and waits (bounded) for the host to send the line ``go``
#: on the serial console (`RunningGuest.send`). So the host acts at a known point of the guest's
#: run without sleeping to guess when it got there.
HOST_PHASE_SH = """\
stty -echo 2>/dev/null || true
host_phase() {
    sync
    echo "GUEST-RESULT: phase=$1"
    answer=
    if ! read -t "${2:-120}" answer; then
        echo "GUEST-FAIL: no answer from the host after phase $1"
        return 1
    fi
    if [ "$answer" != go ]; then
        echo "GUEST-FAIL: the host answered '$answer' after phase $1"
        return 1
    fi
}
"""

_COMPLETE = ".complete"


class GuestUnavailable(Exception):
    """The host cannot run a guest (no QEMU, no busybox, no kernel to be had). Tests skip on it."""


class GuestError(Exception):
    """Building or booting the guest failed in a way that is not the disk's fault."""


@dataclasses.dataclass(frozen=True)
class Disk:
    """One virtio disk as QEMU's ``-drive`` sees it; the guest sees them as vda, vdb, ... in order.

    ``cache="none"`` makes QEMU open the file with O_DIRECT, ``"writeback"`` through the page cache.
    """

    path: Path
    format: str = "raw"
    cache: str = "none"
    readonly: bool = False

    def drive_arg(self) -> str:
        # A comma in a path must be doubled for QEMU's option parser.
        path = str(self.path).replace(",", ",,")
        arg = f"file={path},format={self.format},if=virtio,cache={self.cache},aio=threads"
        if self.readonly:
            arg += ",readonly=on"
        return arg


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What one boot produced.

    ``console`` is the whole serial console; ``stdout`` the script's part of it (between the begin
    and exit markers); ``exit_status`` the script's exit status, None when the guest never got to
    print it (timeout, panic, crash).
    """

    console: str
    stdout: str
    exit_status: int | None
    results: Mapping[str, str]
    timed_out: bool
    qemu_returncode: int | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out

    def explain(self, tail: int = 60) -> str:
        """A failure message: status and the last lines of the console."""
        lines = self.console.splitlines()[-tail:]
        return (
            f"guest exit_status={self.exit_status} timed_out={self.timed_out} "
            f"qemu_rc={self.qemu_returncode} after {self.seconds:.1f}s; console tail:\n"
            + "\n".join(lines)
        )


@dataclasses.dataclass(frozen=True)
class KernelBundle:
    """A cached kernel: the image and the modules to load, already in load order."""

    key: str
    vmlinuz: Path
    modules: tuple[Path, ...]


# --------------------------------------------------------------------------------------------
# Kernel: find the package, fetch it once, keep vmlinuz and the modules we load.


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload,no-any-return]


def _kernel_package() -> tuple[str, str] | None:
    """The concrete kernel package behind the cloud metapackage and its candidate version.

    None when apt cannot say (no package lists): the caller falls back to the cache.
    """
    if shutil.which("apt-cache") is None:
        return None
    deps = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    names = re.findall(r"Depends:\s*(linux-image-[0-9][^\s<>]*-cloud-amd64)", deps.stdout)
    if deps.returncode != 0 or not names:
        return None
    name = names[0]
    show = _run(["apt-cache", "show", "--no-all-versions", name])
    version = re.search(r"^Version:\s*(\S+)", show.stdout, re.MULTILINE)
    if show.returncode != 0 or version is None:
        return None
    return name, version.group(1)


def _cache_key(package: str, version: str) -> str:
    return f"{package}_{version}".replace(":", "%3a")


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section (NUL-separated key=value strings)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", ko)
    if match is None or not match.group(1):
        return []
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d]


def _read_module(path: Path) -> bytes:
    """A module's bytes, decompressed if Debian shipped it compressed."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        tool = shutil.which("zstd")
        if tool is None:
            raise GuestUnavailable(f"{path} is zstd-compressed and zstd is not installed")
        return subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout
    raise GuestError(f"not a kernel module: {path}")


def _module_index(modules_root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko*"):
        base = path.name.split(".ko")[0].replace("-", "_")
        index.setdefault(base, path)
    return index


def _builtin_modules(modules_root: Path) -> set[str]:
    builtin = modules_root / "modules.builtin"
    if not builtin.exists():
        return set()
    return {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in builtin.read_text().splitlines()
        if line.strip()
    }


def resolve_modules(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The wanted modules plus their dependencies, dependencies first, built-ins left out.

    :raise GuestError: a wanted module is neither built in nor shipped.
    """
    index = _module_index(modules_root)
    builtin = _builtin_modules(modules_root)
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in stack:
            raise GuestError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        path = index.get(name)
        if path is None:
            raise GuestError(f"kernel module {name} is neither built in nor in {modules_root}")
        data = _read_module(path)
        for dep in _modinfo_depends(data):
            visit(dep, (*stack, name))
        seen.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return ordered


def _fetch_kernel(package: str, version: str, dest: Path) -> None:
    """Download the kernel package, unpack it in a scratch dir, keep what a guest needs in dest."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as scratch:
        work = Path(scratch)
        # apt-get download drops privileges to _apt when it can; the scratch dir must let it write.
        os.chmod(work, 0o777)
        got = _run(["apt-get", "download", f"{package}={version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise GuestUnavailable(f"apt-get download {package}={version} failed: {got.stderr}")
        tree = work / "tree"
        unpacked = _run(["dpkg", "-x", str(debs[0]), str(tree)])
        if unpacked.returncode != 0:
            raise GuestError(f"dpkg -x {debs[0].name} failed: {unpacked.stderr}")
        vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
        roots = sorted((tree / "lib" / "modules").glob("*")) or sorted(
            (tree / "usr" / "lib" / "modules").glob("*")
        )
        if not vmlinuz or not roots:
            raise GuestError(f"{debs[0].name} holds no vmlinuz or no lib/modules")
        staged = work / "staged"
        (staged / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], staged / "vmlinuz")
        order = []
        for i, (name, data) in enumerate(resolve_modules(roots[0], VIRTIO_BLK_MODULES)):
            filename = f"{i:02d}-{name}.ko"
            (staged / "modules" / filename).write_bytes(data)
            order.append(filename)
        (staged / "modules" / "load-order").write_text("".join(f"{f}\n" for f in order))
        (staged / "kernel-release").write_text(roots[0].name + "\n")
        (staged / _COMPLETE).write_text(f"{package} {version}\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


def _load_bundle(key: str, directory: Path) -> KernelBundle:
    order = (directory / "modules" / "load-order").read_text().split()
    return KernelBundle(
        key=key,
        vmlinuz=directory / "vmlinuz",
        modules=tuple(directory / "modules" / name for name in order),
    )


def _cached_bundles(cache_dir: Path) -> list[Path]:
    if not cache_dir.is_dir():
        return []
    found = [p for p in cache_dir.iterdir() if (p / _COMPLETE).exists()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@contextlib.contextmanager
def _locked(cache_dir: Path):  # type: ignore[no-untyped-def]
    """Serialise fetches between concurrent test runs sharing one cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_kernel(cache_dir: Path = DEFAULT_CACHE_DIR) -> KernelBundle:
    """The cached kernel for the current Debian candidate, fetched on first use.

    A fresh machine may have no apt package lists: then, as root and with nothing cached, this
    runs ``apt-get update`` once rather than skip every VM test. When apt still cannot say, or the
    download fails, the newest complete cache entry is used, so an offline rerun works.

    :raise GuestUnavailable: no kernel in the cache and none can be downloaded.
    """
    with _locked(cache_dir):
        cached = _cached_bundles(cache_dir)
        found = _kernel_package()
        if found is None and not cached and os.geteuid() == 0 and shutil.which("apt-get"):
            log.info("apt cannot resolve %s: running apt-get update once", KERNEL_METAPACKAGE)
            _run(["apt-get", "update", "-qq"], timeout=600)
            found = _kernel_package()
        if found is not None:
            key = _cache_key(*found)
            directory = cache_dir / key
            if (directory / _COMPLETE).exists():
                return _load_bundle(key, directory)
            try:
                if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
                    raise GuestUnavailable("apt-get/dpkg missing: cannot fetch a kernel")
                log.info("fetching %s %s into %s", found[0], found[1], directory)
                _fetch_kernel(found[0], found[1], directory)
                return _load_bundle(key, directory)
            except GuestUnavailable:
                if not cached:
                    raise
                log.warning("cannot fetch %s; using cached %s", key, cached[0].name)
        if not cached:
            raise GuestUnavailable(
                f"apt cannot resolve {KERNEL_METAPACKAGE} (run apt-get update) and "
                f"{cache_dir} holds no kernel"
            )
        return _load_bundle(cached[0].name, cached[0])


# --------------------------------------------------------------------------------------------
# Initramfs: a cpio "newc" archive written directly, so device nodes need no privileges.

_NEWC_MAGIC = b"070701"


class CpioWriter:
    """Writes a cpio "newc" archive (the format the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\x00"
        # newc header fields, in order: ino mode uid gid nlink mtime filesize devmajor devminor
        # rdevmajor rdevminor namesize check; each written as 8 hex digits.
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0]
        self._ino += 1
        self._out.write(_NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\x00" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


_INIT = """#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo 1 > /proc/sys/kernel/printk
for m in $(cat /modules/load-order); do
    insmod /modules/$m || echo "GUEST-WARN: insmod $m failed"
done
n=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt {ndisks} ] && [ $n -lt 100 ]; do
    usleep 50000; n=$((n + 1))
done
echo "GUEST-DISKS: $(ls /sys/block | grep '^vd' | tr '\\n' ' ')"
echo {begin}
cd /tmp
sh -e /guest/script.sh
rc=$?
sync
echo "{exit}$rc"
poweroff -f
"""


_INITRAMFS_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt")
_GUEST_DIRS = ("modules", "guest")


_ELF64_HEADER = struct.Struct("<16xHHIQQQIHHH")  # e_type .. e_phnum (ELF64 little-endian)
_PT_INTERP = 3  # a program header naming a dynamic loader


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP header, i.e. one that needs no libc."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    *_, phoff, _, _, _, phentsize, phnum = _ELF64_HEADER.unpack_from(data)
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != _PT_INTERP for i in range(phnum)
    )


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    raise GuestUnavailable("no static busybox (apt-get install busybox-static)")


def build_initramfs(kernel: KernelBundle, script: str, ndisks: int) -> bytes:
    """A gzip'd initramfs whose /init loads the virtio modules and runs ``script`` with ``sh -e``."""
    cpio = CpioWriter()
    for directory in (*_INITRAMFS_DIRS, *_GUEST_DIRS):
        cpio.directory(directory)
    # The kernel opens /dev/console before /init runs; devtmpfs is mounted only afterwards.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for module in kernel.modules:
        cpio.file(f"modules/{module.name}", module.read_bytes())
    cpio.file("modules/load-order", "".join(f"{m.name}\n" for m in kernel.modules).encode())
    init = _INIT.format(ndisks=ndisks, begin=BEGIN_MARKER, exit=EXIT_MARKER)
    cpio.file("init", init.encode(), 0o755)
    cpio.file("guest/script.sh", script.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=1)


# --------------------------------------------------------------------------------------------
# Booting.


def parse_console(console: str) -> tuple[str, int | None, dict[str, str]]:
    """Split the console into the script's output, its exit status and its result lines."""
    lines = console.replace("\r", "").splitlines()
    begin = next((i for i, line in enumerate(lines) if line.strip() == BEGIN_MARKER), None)
    body: list[str] = []
    status: int | None = None
    results: dict[str, str] = {}
    for line in lines[(begin + 1 if begin is not None else 0) :]:
        if line.startswith(EXIT_MARKER):
            with contextlib.suppress(ValueError):
                status = int(line[len(EXIT_MARKER) :].strip())
            break
        body.append(line)
        if line.startswith(RESULT_MARKER):
            key, _, value = line[len(RESULT_MARKER) :].partition("=")
            results[key.strip()] = value.strip()
    return "\n".join(body), status, results


@dataclasses.dataclass(frozen=True)
class GuestKit:
    """A kernel ready to boot; `run` boots one guest per call."""

    kernel: KernelBundle
    qemu: str

    @classmethod
    def prepare(cls, cache_dir: Path | str = DEFAULT_CACHE_DIR) -> GuestKit:
        """Check the host tools and get the kernel (cached after the first call).

        :raise GuestUnavailable: QEMU, busybox or a kernel is missing.
        """
        qemu = shutil.which(QEMU)
        if qemu is None:
            raise GuestUnavailable(f"{QEMU} not found (apt-get install qemu-system-x86)")
        _busybox()
        return cls(kernel=prepare_kernel(Path(cache_dir)), qemu=qemu)

    def command(self, kernel_path: Path, initrd_path: Path, disks: Sequence[Disk]) -> list[str]:
        cmd = [
            self.qemu,
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "512",
            "-nodefaults",
            "-no-reboot",
            "-nic",
            "none",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            str(kernel_path),
            "-initrd",
            str(initrd_path),
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 i8042.noaux i8042.nokbd tsc=reliable",
        ]
        for disk in disks:
            cmd += ["-drive", disk.drive_arg()]
        return cmd

    def start(
        self,
        script: str,
        disks: Sequence[Disk | tuple[str | os.PathLike[str], Mapping[str, object]]] = (),
    ) -> RunningGuest:
        """Boot a guest that runs ``script`` (``sh -e``) and return at once, while it runs.

        The host follows the console with `RunningGuest.expect` and answers the script's
        ``host_phase`` calls with `RunningGuest.send`; `RunningGuest.wait` ends it. Use the result
        as a context manager: leaving it kills a QEMU that is still running (by its pid).

        :raise GuestError: QEMU could not be started.
        """
        drives = [d if isinstance(d, Disk) else Disk(Path(d[0]), **d[1]) for d in disks]  # type: ignore[arg-type]
        scratch = tempfile.TemporaryDirectory(prefix="guestvm-")
        try:
            initrd = Path(scratch.name) / "initrd.gz"
            initrd.write_bytes(build_initramfs(self.kernel, script, len(drives)))
            cmd = self.command(self.kernel.vmlinuz, initrd, drives)
            log.debug("booting: %s", " ".join(cmd))
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as e:
            scratch.cleanup()
            raise GuestError(f"cannot start {self.qemu}: {e}") from e
        return RunningGuest(proc, scratch)

    def run(
        self,
        script: str,
        disks: Sequence[Disk | tuple[str | os.PathLike[str], Mapping[str, object]]] = (),
        timeout: float = 120,
    ) -> GuestResult:
        """Boot a guest that runs ``script`` (``sh -e``) and powers off; wait at most ``timeout``.

        On timeout the QEMU process this call started is killed (by its pid) and the result has
        ``timed_out`` set. Never raises for what happens inside the guest: look at the result.

        :raise GuestError: QEMU could not be started.
        """
        with self.start(script, disks) as guest:
            return guest.wait(timeout)


class RunningGuest:
    """One booted guest: its console as it arrives, a line to send it, and its end.

    A reader thread collects the serial console; `expect` blocks until the script prints a given
    ``GUEST-RESULT:`` line (the guest says when it got somewhere, so the host never sleeps to
    guess). `send` writes a line to the guest's serial input, which the script reads in
    ``host_phase``. Every wait is bounded; on leaving the ``with`` block a QEMU still running is
    killed by its pid, and the scratch directory (initramfs) is removed.
    """

    def __init__(self, proc: subprocess.Popen[bytes], scratch: tempfile.TemporaryDirectory[str]):
        self._proc = proc
        self._scratch = scratch
        self._started = time.monotonic()
        self._chunks: list[str] = []
        self._eof = False
        self._timed_out = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_console, name="guest-console")
        self._reader.daemon = True
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _read_console(self) -> None:
        out = self._proc.stdout
        assert out is not None
        for raw in iter(out.readline, b""):
            with self._cond:
                self._chunks.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def console(self) -> str:
        """The console so far, ``\r`` removed."""
        with self._cond:
            return "".join(self._chunks).replace("\r", "")

    def explain(self, tail: int = 40) -> str:
        lines = self.console().splitlines()[-tail:]
        return f"guest pid {self.pid} console tail:\n" + "\n".join(lines)

    def seen(self, key: str, value: str) -> bool:
        """Whether the guest has printed ``GUEST-RESULT: key=value`` yet (does not wait)."""
        want = f"{RESULT_MARKER}{key}={value}"
        return any(line.strip() == want for line in self.console().splitlines())

    def expect(self, key: str, value: str, timeout: float = 60) -> float:
        """Wait until the guest prints ``GUEST-RESULT: key=value``; the seconds since boot.

        :raise GuestError: the guest ended (or ``timeout`` passed) without printing it; the
            message holds the console tail.
        """
        want = f"{RESULT_MARKER}{key}={value}"
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = "".join(self._chunks).replace("\r", "").splitlines()
                if any(line.strip() == want for line in lines):
                    return time.monotonic() - self._started
                if self._eof:
                    why = "the guest ended"
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"{timeout:.0f}s passed"
                    break
                self._cond.wait(left)
        raise GuestError(f"{why} before {want!r}; {self.explain()}")

    def send(self, line: str) -> None:
        """Write one line to the guest's serial input (what ``host_phase`` reads).

        :raise GuestError: QEMU is gone.
        """
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise GuestError(f"cannot write to the guest: {e}; {self.explain()}") from e

    def wait(self, timeout: float = 120) -> GuestResult:
        """Wait at most ``timeout`` for the guest to power off (kill it after that); the result.

        Never raises for what happens inside the guest: look at the result.
        """
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._timed_out = True
        finally:
            self.kill()
        seconds = time.monotonic() - self._started
        console = self.console()
        stdout, status, results = parse_console(console)
        return GuestResult(
            console=console,
            stdout=stdout,
            exit_status=status,
            results=results,
            timed_out=self._timed_out,
            qemu_returncode=self._proc.returncode,
            seconds=seconds,
        )

    def kill(self) -> None:
        """Kill QEMU if it still runs (by its pid), reap it, drop the scratch directory."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, 9)
            self._proc.wait()
        # Once QEMU is gone its stdout reaches EOF, so the reader ends promptly.
        self._reader.join(timeout=10)
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._proc.stdout is not None and not self._reader.is_alive():
            self._proc.stdout.close()
        self._scratch.cleanup()


# --------------------------------------------------------------------------------------------
# Workloads shared by tests/test_vm.py and examples/vm.sh.

SECTOR = 512
_RECORD = 64
_RECORDS_PER_SECTOR = SECTOR // _RECORD


def pattern_sector(sector: int, tag: str) -> bytes:
    """The 512 bytes the pattern workload writes at ``sector``: text naming the sector and tag.

    Like nbdkit's pattern plugin, every piece says where it belongs, so data read back from the
    wrong place is obvious in a hexdump.
    """
    return b"".join(
        (f"{tag} sector={sector:010d} word={w}".ljust(_RECORD - 1) + "\n").encode()
        for w in range(_RECORDS_PER_SECTOR)
    )


@dataclasses.dataclass(frozen=True)
class PatternWorkload:
    """Writes known patterns across the disk with busybox dd and reads them back in the guest.

    Extents (in 512-byte sectors) cover the first and last MiB, odd sector offsets and lengths that
    straddle 4 KiB pages, and an overwrite in the middle of an earlier extent.
    """

    disk_bytes: int
    tag: str = "blockfs"

    def extents(self) -> list[tuple[int, int, str]]:
        """(first sector, sector count, tag) in the order written; later ones overwrite."""
        total = self.disk_bytes // SECTOR
        mib = (1 << 20) // SECTOR
        spread = [
            (0, mib, self.tag),  # the first MiB
            (total - mib, mib, self.tag),  # the last MiB
            (total // 2 + 3, 77, self.tag),  # unaligned start, odd length
            (total // 3 + 8, 9, self.tag),  # page-aligned start, one sector past a page
        ]
        spread += [(k * total // 8 + 1, 33, self.tag) for k in range(1, 8)]
        spread.append((mib // 2 - 5, 10, self.tag + "-over"))  # rewrites the middle of extent 0
        return spread

    def script(self, device: str = "/dev/vda") -> str:
        gen = (
            "awk -v s=$1 -v n=$2 -v t=$3 'BEGIN { for (i = s; i < s + n; i++) "
            'for (w = 0; w < 8; w++) printf "%-63s\\n", sprintf("%s sector=%010d word=%d", '
            "t, i, w) }'"
        )
        lines = [
            "set -e",
            f"dev={device}",
            'echo "disk bytes: $(blockdev --getsize64 $dev)"',
            f"gen() {{ {gen}; }}",
        ]
        # O_DIRECT in the guest too, so every write reaches the virtio disk before the next one.
        for first, count, tag in self.extents():
            lines.append(
                f"gen {first} {count} {tag} > p.bin\n"
                f"dd if=p.bin of=$dev bs=512 seek={first} conv=notrunc,fsync oflag=direct "
                "2>/dev/null"
            )
        lines.append("echo 3 > /proc/sys/vm/drop_caches")
        # Read back the final state (later extents overwrote parts of earlier ones).
        for first, count in self._final_runs():
            lines.append(
                f"gen {first} {count} {self._tag_at(first)} > exp.bin\n"
                f"dd if=$dev of=got.bin bs=512 skip={first} count={count} iflag=direct "
                "2>/dev/null\n"
                f"cmp exp.bin got.bin\n"
                f"echo verified {first}+{count}"
            )
        lines.append('echo "GUEST-RESULT: pattern=verified"')
        return "\n".join(lines) + "\n"

    def expected(self) -> dict[int, bytes]:
        """Sector -> content after the workload, for every sector it wrote."""
        sectors: dict[int, bytes] = {}
        for first, count, tag in self.extents():
            for s in range(first, first + count):
                sectors[s] = pattern_sector(s, tag)
        return sectors

    def _tag_at(self, sector: int) -> str:
        tag = ""
        for first, count, t in self.extents():
            if first <= sector < first + count:
                tag = t
        return tag

    def _final_runs(self) -> list[tuple[int, int]]:
        """Maximal runs of sectors whose final content has one tag, in sector order."""
        final = {s: self._tag_at(s) for s in self.expected()}
        runs: list[tuple[int, int]] = []
        for s in sorted(final):
            if runs and runs[-1][0] + runs[-1][1] == s and self._tag_at(runs[-1][0]) == final[s]:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((s, 1))
        return runs

    def verify_host(self, image: Path) -> list[str]:
        """Compare the raw image with what the guest wrote; a list of mismatches, empty if none."""
        problems = []
        with open(image, "rb") as f:
            for sector, want in sorted(self.expected().items()):
                f.seek(sector * SECTOR)
                got = f.read(SECTOR)
                if got != want:
                    problems.append(f"sector {sector}: got {got[:48]!r}")
                    if len(problems) >= 10:
                        break
        return problems


@dataclasses.dataclass(frozen=True)
class Ext2Workload:
    """busybox mke2fs, mount (ext4 driver), write files, sync, unmount; the host fscks and reads.

    File contents are small and deterministic so the host can compare them byte for byte.
    """

    files: Mapping[str, bytes] = dataclasses.field(
        default_factory=lambda: {
            "/hello.txt": b"hello from the guest\n",
            "/dir/numbers.txt": "".join(f"{i}\n" for i in range(20000)).encode(),
            "/dir/sub/pattern.bin": b"".join(pattern_sector(s, "ext2") for s in range(600)),
        }
    )

    def script(self, device: str = "/dev/vda") -> str:
        lines = [
            "set -e",
            f"dev={device}",
            "mke2fs -F -L guestfs $dev > /dev/null",
            "mount -t ext4 $dev /mnt",
            "mkdir -p /mnt/dir/sub",
            'echo "hello from the guest" > /mnt/hello.txt',
            "seq 0 19999 > /mnt/dir/numbers.txt",
            (
                "awk 'BEGIN { for (i = 0; i < 600; i++) for (w = 0; w < 8; w++) "
                'printf "%-63s\\n", sprintf("ext2 sector=%010d word=%d", i, w) }\' '
                "> /mnt/dir/sub/pattern.bin"
            ),
            "sync",
            "md5sum /mnt/hello.txt /mnt/dir/numbers.txt /mnt/dir/sub/pattern.bin",
            "umount /mnt",
            'echo "GUEST-RESULT: ext2=written"',
        ]
        return "\n".join(lines) + "\n"

    def verify_host(self, image: Path) -> list[str]:
        """Run ``e2fsck -fn`` and read every file back with debugfs; a list of problems."""
        problems = []
        fsck = _run(["e2fsck", "-fn", str(image)])
        if fsck.returncode != 0:
            problems.append(f"e2fsck -fn exit {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}")
        for name, want in self.files.items():
            got = subprocess.run(
                ["debugfs", "-R", f"cat {name}", str(image)], capture_output=True, check=False
            )
            if got.stdout != want:
                problems.append(
                    f"{name}: {len(got.stdout)} bytes, want {len(want)}: "
                    f"{got.stderr.decode(errors='replace').strip()}"
                )
        return problems


def find_tag(image: Path, tag: bytes, limit: int = 5) -> list[int]:
    """Byte offsets where ``tag`` occurs in the file (at most ``limit`` of them)."""
    found: list[int] = []
    overlap = len(tag) - 1
    with open(image, "rb") as f:
        base = 0
        tail = b""
        while len(found) < limit:
            block = f.read(4 << 20)
            if not block:
                break
            data = tail + block
            start = 0
            while len(found) < limit:
                i = data.find(tag, start)
                if i < 0:
                    break
                found.append(base - len(tail) + i)
                start = i + 1
            tail = data[-overlap:] if overlap else b""
            base += len(block)
    return found


def _compare_sectors(image: Path, sectors: Mapping[int, bytes]) -> list[str]:
    problems = []
    with open(image, "rb") as f:
        for sector, want in sorted(sectors.items()):
            f.seek(sector * SECTOR)
            got = f.read(SECTOR)
            if got != want:
                problems.append(f"sector {sector}: got {got[:48]!r}")
                if len(problems) >= 10:
                    break
    return problems


@dataclasses.dataclass(frozen=True)
class PointInTimeWorkload:
    """Markers written before and after a pause the host fills: for jobs started mid-run.

    Phase one writes ``BEFORE`` extents across the disk and stops at ``host_phase
    before-written``; the host starts its job there. Phase two writes ``AFTER-load`` MiB blocks
    with dd, then ``AFTER`` extents over every ``BEFORE`` extent and many other places, and stops
    at ``host_phase after-written``, so the host can look while the job still runs. A point-in-time
    copy taken at the pause holds every ``BEFORE`` and no ``AFTER``; the live disk holds every
    ``AFTER`` and no ``BEFORE``. Every write is O_DIRECT in the guest and the phases end in sync.
    """

    disk_bytes: int
    load_mib: int = 8
    PHASES = ("before-written", "after-written")

    def before_extents(self) -> list[tuple[int, int]]:
        total = self.disk_bytes // SECTOR
        return [(k * total // 16 + 7, 8) for k in range(16)]

    def after_extents(self) -> list[tuple[int, int]]:
        total = self.disk_bytes // SECTOR
        return [*self.before_extents(), *((k * total // 48 + 3 * k + 1, 5) for k in range(48))]

    def load_mibs(self) -> list[int]:
        """Where the load goes, in MiB; the AFTER extents are written after it."""
        mibs = self.disk_bytes >> 20
        return sorted({k * mibs // self.load_mib for k in range(self.load_mib)})

    def script(self, device: str = "/dev/vda") -> str:
        gen = (
            "awk -v s=$1 -v n=$2 -v t=$3 'BEGIN { for (i = s; i < s + n; i++) "
            'for (w = 0; w < 8; w++) printf "%-63s\\n", sprintf("%s sector=%010d word=%d", '
            "t, i, w) }'"
        )
        put = "dd if=p.bin of=$dev bs=512 seek=$1 conv=notrunc oflag=direct 2>/dev/null"
        lines = [
            "set -e",
            f"dev={device}",
            f"gen() {{ {gen}; }}",
            f"put() {{ gen $1 $2 $3 > p.bin; {put}; }}",
            HOST_PHASE_SH,
        ]
        lines += [f"put {first} {count} BEFORE" for first, count in self.before_extents()]
        lines.append("host_phase before-written")
        lines += [
            "gen 0 256 AFTER-load > c.bin",
            "cat c.bin c.bin c.bin c.bin c.bin c.bin c.bin c.bin > mib.bin",
            f"for m in {' '.join(map(str, self.load_mibs()))}; do",
            "    dd if=mib.bin of=$dev bs=1M seek=$m conv=notrunc oflag=direct 2>/dev/null",
            "done",
        ]
        lines += [f"put {first} {count} AFTER" for first, count in self.after_extents()]
        lines.append("host_phase after-written")
        lines.append('echo "GUEST-RESULT: markers=written"')
        return "\n".join(lines) + "\n"

    def verify_snapshot(self, image: Path) -> list[str]:
        """A raw image taken at the pause: every BEFORE extent there, no AFTER anywhere."""
        want = {
            s: pattern_sector(s, "BEFORE")
            for first, count in self.before_extents()
            for s in range(first, first + count)
        }
        problems = _compare_sectors(image, want)
        problems += [f"AFTER at byte {off}" for off in find_tag(image, b"AFTER")]
        return problems

    def verify_host(self, image: Path) -> list[str]:
        """The raw live image after the run: every AFTER extent there, no BEFORE anywhere."""
        want = {
            s: pattern_sector(s, "AFTER")
            for first, count in self.after_extents()
            for s in range(first, first + count)
        }
        problems = _compare_sectors(image, want)
        problems += [f"BEFORE at byte {off}" for off in find_tag(image, b"BEFORE")]
        return problems


@dataclasses.dataclass(frozen=True)
class SwitchOverWorkload:
    """Markers written before, while and after a job moves the disk to another image: for a
    mirror, which copies the disk while the guest writes and then switches it over.

    The disk is cut into 16 slices. Phase one writes a ``BEFORE`` extent at the start of each
    slice and stops at ``host_phase before-written``; the host starts its job there. Phase two
    writes ``DURING-load`` MiB blocks (where no BEFORE or DURING extent lies), then a
    ``DURING`` extent a third into each slice, each in disk order, and stops at ``host_phase
    during-written``; the host lets the job catch up and switch the disk over there. Phase
    three writes two ``AFTER`` extents per slice, one in the cluster of that slice's DURING
    extent (a 64 KiB cluster then holds data from both sides of the switch) and one two thirds
    in, syncs and ends. Extents of different phases never overlap; AFTER extents overwrite
    parts of the load. Every write is O_DIRECT in the guest and every phase ends in sync.

    The disk after the run holds every marker of the three phases (`verify_host`); the image
    the disk moved away from holds every BEFORE and DURING marker and no AFTER anywhere
    (`verify_left_behind`).
    """

    disk_bytes: int
    load_mib: int = 4
    PHASES = ("before-written", "during-written")

    @property
    def _slice(self) -> int:
        return self.disk_bytes // SECTOR // 16

    def before_extents(self) -> list[tuple[int, int]]:
        return [(k * self._slice + 7, 8) for k in range(16)]

    def during_extents(self) -> list[tuple[int, int]]:
        return [(k * self._slice + self._slice // 3 + 1, 11) for k in range(16)]

    def after_extents(self) -> list[tuple[int, int]]:
        """Two per slice: just past the DURING extent (one sector between them), and further."""
        near = [(first + count + 1, 6) for first, count in self.during_extents()]
        far = [(k * self._slice + 2 * self._slice // 3 + 5, 9) for k in range(16)]
        return sorted(near + far)

    def load_mibs(self) -> list[int]:
        """``load_mib`` MiB blocks spread over the disk, none touching a BEFORE or DURING
        extent; written first in phase two."""
        per_mib = (1 << 20) // SECTOR
        taken = {
            s // per_mib
            for first, count in (*self.before_extents(), *self.during_extents())
            for s in (first, first + count - 1)
        }
        free = [m for m in range(self.disk_bytes >> 20) if m not in taken]
        if len(free) < self.load_mib:
            raise ValueError(f"a {self.disk_bytes}-byte disk has no room for the load")
        return [free[k * len(free) // self.load_mib] for k in range(self.load_mib)]

    def script(self, device: str = "/dev/vda") -> str:
        gen = (
            "awk -v s=$1 -v n=$2 -v t=$3 'BEGIN { for (i = s; i < s + n; i++) "
            'for (w = 0; w < 8; w++) printf "%-63s\\n", sprintf("%s sector=%010d word=%d", '
            "t, i, w) }'"
        )
        put = "dd if=p.bin of=$dev bs=512 seek=$1 conv=notrunc oflag=direct 2>/dev/null"
        per_mib = (1 << 20) // SECTOR
        lines = [
            "set -e",
            f"dev={device}",
            f"gen() {{ {gen}; }}",
            f"put() {{ gen $1 $2 $3 > p.bin; {put}; }}",
            HOST_PHASE_SH,
        ]
        lines += [f"put {first} {count} BEFORE" for first, count in self.before_extents()]
        lines.append("host_phase before-written")
        lines += [
            f"gen {m * per_mib} {per_mib} DURING-load > p.bin\n"
            f"dd if=p.bin of=$dev bs=1M seek={m} conv=notrunc oflag=direct 2>/dev/null"
            for m in self.load_mibs()
        ]
        lines += [f"put {first} {count} DURING" for first, count in self.during_extents()]
        lines.append("host_phase during-written")
        lines += [f"put {first} {count} AFTER" for first, count in self.after_extents()]
        lines.append("sync")
        lines.append('echo "GUEST-RESULT: markers=written"')
        return "\n".join(lines) + "\n"

    def _expected(self, *, after: bool) -> dict[int, bytes]:
        per_mib = (1 << 20) // SECTOR
        runs = [(m * per_mib, per_mib, "DURING-load") for m in self.load_mibs()]
        runs += [(first, count, "BEFORE") for first, count in self.before_extents()]
        runs += [(first, count, "DURING") for first, count in self.during_extents()]
        if after:
            runs += [(first, count, "AFTER") for first, count in self.after_extents()]
        return {
            s: pattern_sector(s, tag)
            for first, count, tag in runs
            for s in range(first, first + count)
        }

    def verify_host(self, image: Path) -> list[str]:
        """The raw disk after the run: every BEFORE, DURING and AFTER extent, and the load
        where no AFTER extent overwrote it."""
        return _compare_sectors(image, self._expected(after=True))

    def verify_left_behind(self, image: Path) -> list[str]:
        """A raw image the disk switched away from between phases two and three: every BEFORE
        and DURING extent and the load, no AFTER anywhere."""
        problems = _compare_sectors(image, self._expected(after=False))
        problems += [f"AFTER at byte {off}" for off in find_tag(image, b"AFTER")]
        return problems


WORKLOADS = {
    "pattern": PatternWorkload,
    "ext2": Ext2Workload,
    "markers": PointInTimeWorkload,
    "switch-over": SwitchOverWorkload,
}


def make_workload(
    name: str, disk_bytes: int
) -> PatternWorkload | Ext2Workload | PointInTimeWorkload | SwitchOverWorkload:
    if name == "markers":
        return PointInTimeWorkload(disk_bytes)
    if name == "switch-over":
        return SwitchOverWorkload(disk_bytes)
    if name == "pattern":
        return PatternWorkload(disk_bytes)
    if name == "ext2":
        return Ext2Workload()
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


# --------------------------------------------------------------------------------------------
# Command line.


def _parse_disk(spec: str) -> Disk:
    """``PATH[:cache=none][:format=raw]``."""
    path, *opts = spec.split(":")
    kw: dict[str, str] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("cache", "format"):
            raise argparse.ArgumentTypeError(f"unknown disk option {key!r}")
        kw[key] = value
    return Disk(Path(path), **kw)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.guestvm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fetch and cache the kernel, print what is cached")
    run = sub.add_parser("run", help="boot a guest on a disk and run a workload or script")
    run.add_argument("--disk", type=_parse_disk, action="append", default=[])
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--workload", choices=sorted(WORKLOADS))
    what.add_argument("--script", type=Path, help="a shell script to run in the guest")
    run.add_argument(
        "--verify",
        type=Path,
        metavar="IMAGE",
        help="after the boot, check the workload's result in this raw image",
    )
    run.add_argument("--timeout", type=float, default=120)
    run.add_argument(
        "--handshake",
        action="store_true",
        help="at each phase of a phased workload (markers, switch-over) print 'guestvm: "
        "phase=NAME' and let the guest go on only when a line ('go') arrives on stdin; without "
        "it the guest goes on",
    )
    run.add_argument("--console", action="store_true", help="print the whole console")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A caller stopping us (kill PID) must not leave QEMU running: unwind through `with`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    try:
        kit = GuestKit.prepare(args.cache_dir)
    except GuestUnavailable as e:
        print(f"guestvm: cannot run a guest: {e}", file=sys.stderr)
        return 2
    if args.command == "prepare":
        print(f"kernel {kit.kernel.key}: {kit.kernel.vmlinuz}")
        for module in kit.kernel.modules:
            print(f"  module {module.name}")
        return 0

    workload = None
    if args.workload:
        if not args.disk:
            parser.error("--workload needs --disk")
        workload = make_workload(args.workload, args.disk[0].path.stat().st_size)
        script = workload.script()
    else:
        script = args.script.read_text()
    phases: tuple[str, ...] = ()
    if isinstance(workload, PointInTimeWorkload | SwitchOverWorkload):
        phases = workload.PHASES
    deadline = time.monotonic() + args.timeout
    with kit.start(script, args.disk) as guest:
        for phase in phases:
            try:
                guest.expect("phase", phase, timeout=max(1.0, deadline - time.monotonic()))
            except GuestError as e:
                print(f"guestvm: {e}", file=sys.stderr)
                break
            answer = "go"
            if args.handshake:
                # Tell the caller where the guest stands; its next stdin line is the answer.
                print(f"guestvm: phase={phase}", flush=True)
                answer = sys.stdin.readline().strip()
                if not answer:
                    print("guestvm: stdin closed: killing the guest", file=sys.stderr)
                    guest.kill()
                    return 1
            guest.send(answer)
        result = guest.wait(max(1.0, deadline - time.monotonic()))
    print(result.console if args.console else result.stdout)
    print(f"guestvm: exit_status={result.exit_status} in {result.seconds:.1f}s")
    if not result.ok:
        if not args.console:
            print(result.explain(), file=sys.stderr)
        return 1
    if args.verify and workload is not None:
        problems = workload.verify_host(args.verify)
        for problem in problems:
            print(f"guestvm: host check: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"guestvm: host check of {args.verify}: clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
