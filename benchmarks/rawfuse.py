"""A prototype of the other request loop (issue 17, part 2): FUSE spoken directly, by threads.

No libfuse, no pyfuse3, no trio: the process opens ``/dev/fuse``, mounts it (root: mount(2)),
answers INIT, then N threads each read requests from their own descriptor, cloned from the
first with ``FUSE_DEV_IOC_CLONE`` (the kernel hands each request to one reader), and answer
them: READ is one ``os.pread`` and one ``os.writev`` of the header and the data; WRITE is one
``os.pwrite`` of a view of the request buffer (the payload is never copied into a bytes
object); the rest (LOOKUP, GETATTR, OPEN, ...) is answered for one file over one raw image.
Every system call releases the GIL, so the threads overlap their reads, copies and replies; only
the header parsing holds it.

It is a measuring instrument, not a file system to use: one file, no permissions, no jobs.

    python -m benchmarks.rawfuse IMAGE MNT [THREADS]     # serves MNT/disk until unmounted
    python -m benchmarks.rawfuse --bench IMAGE [THREADS...]   # fio beside the floor
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import sys
import threading
import time

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, ...
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_write, time_gran, max_pages, ...
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime ns*3 mode ...
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid ns ns
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
RW_IN = struct.Struct("<QQII")  # fh offset size flags (read and write)
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino off namelen type

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS, INTERRUPT, DESTROY, BATCH_FORGET = 27, 28, 29, 34, 36, 38, 42
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)

FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15  # AIO on direct I/O completes asynchronously (libfuse's default too)
FUSE_MAX_PAGES = 1 << 22
FOPEN_DIRECT_IO = 1 << 0
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
MAX_WRITE = 1 << 20
BUFSIZE = MAX_WRITE + 64 * 1024
ROOT, DISK, NAME = 1, 2, b"disk"
MS_NOSUID, MS_NODEV = 2, 4


class RawFuse:
    def __init__(self, image: str, mountpoint: str, threads: int) -> None:
        self.img = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.img).st_size
        self.mountpoint = mountpoint
        self.threads = threads
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)

    # -- mounting --------------------------------------------------------------------------

    def mount(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        data = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"rawfuse", self.mountpoint.encode(), b"fuse.rawfuse",
                      MS_NOSUID | MS_NODEV, data) != 0:  # fmt: skip
            err = ctypes.get_errno()
            raise OSError(err, f"mount: {os.strerror(err)}")

    def clone(self) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", self.fd))
        return fd

    # -- answering -------------------------------------------------------------------------

    def attr(self, inode: int) -> bytes:
        if inode == ROOT:
            return ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0,
                             4096, 0)  # fmt: skip
        return ATTR.pack(DISK, self.size, self.size // 512, 0, 0, 0, 0, 0, 0,
                         stat.S_IFREG | 0o644, 1, 0, 0, 0, 4096, 0)  # fmt: skip

    def serve(self, fd: int) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        img = self.img
        pread, pwrite, writev, readv = os.pread, os.pwrite, os.writev, os.readv
        while True:
            try:
                n = readv(fd, [buf])
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.EBADF):
                    return  # unmounted
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue  # ENOENT: a request interrupted before we read it
                raise
            _, op, unique, node, _, _, _, _, _ = IN_HEADER.unpack_from(buf)
            if op == READ:
                _, off, size, _ = RW_IN.unpack_from(buf, 40)
                data = pread(img, size, off)
                writev(fd, [OUT_HEADER.pack(16 + len(data), 0, unique), data])
                continue
            if op == WRITE:
                _, off, size, _ = RW_IN.unpack_from(buf, 40)
                done = pwrite(img, view[80 : 80 + size], off)
                writev(fd, [OUT_HEADER.pack(24, 0, unique), WRITE_OUT.pack(done, 0)])
                continue
            if op in NO_REPLY:
                continue
            reply = self.other(op, node, view[40:n])
            if isinstance(reply, int):
                os.write(fd, OUT_HEADER.pack(16, -reply, unique))
            else:
                os.writev(fd, [OUT_HEADER.pack(16 + len(reply), 0, unique), reply])
            if op == DESTROY:
                return

    def other(self, op: int, node: int, arg: memoryview) -> bytes | int:
        """Every request but READ and WRITE: bytes to reply, or an errno."""
        if op == INIT:
            _, minor, readahead, _ = INIT_IN.unpack_from(arg)
            flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES
            return INIT_OUT.pack(7, min(minor, 31), readahead, flags, 16, 12, MAX_WRITE, 1,
                                 MAX_WRITE // 4096, 0, 0, 0)  # fmt: skip
        if op == LOOKUP:
            if node != ROOT or bytes(arg).rstrip(b"\0") != NAME:
                return errno.ENOENT
            return ENTRY_OUT_HEAD.pack(DISK, 0, 3600, 3600, 0, 0) + self.attr(DISK)
        if op in (GETATTR, SETATTR):
            return ATTR_OUT_HEAD.pack(3600, 0, 0) + self.attr(node)
        if op in (OPEN, OPENDIR):
            return OPEN_OUT.pack(node, FOPEN_DIRECT_IO if op == OPEN else 0, 0)
        if op == READDIR:
            _, off, _, _ = RW_IN.unpack_from(arg)
            if off:
                return b""
            ent = DIRENT.pack(DISK, 1, len(NAME), stat.S_IFREG >> 12) + NAME
            return ent + bytes(-len(ent) % 8)
        if op == STATFS:
            return STATFS_OUT.pack(0, 0, 0, 2, 0, 4096, 255, 4096, 0)
        if op == FSYNC:
            os.fsync(self.img)
            return b""
        if op in (RELEASE, RELEASEDIR, FLUSH, ACCESS, DESTROY):
            return b""
        return errno.ENOSYS

    def run(self) -> None:
        self.mount()
        self.serve_one_init()
        fds = [self.fd] + [self.clone() for _ in range(self.threads - 1)]
        workers = [threading.Thread(target=self.serve, args=(fd,), daemon=True) for fd in fds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def serve_one_init(self) -> None:
        """The first request is INIT; it is answered before the other readers start."""
        buf = bytearray(BUFSIZE)
        n = os.readv(self.fd, [buf])
        _, op, unique, node, _, _, _, _, _ = IN_HEADER.unpack_from(buf)
        assert op == INIT, op
        reply = self.other(op, node, memoryview(buf)[40:n])
        assert isinstance(reply, bytes)
        os.writev(self.fd, [OUT_HEADER.pack(16 + len(reply), 0, unique), reply])


def bench(image: str, counts: list[int]) -> None:
    """fio's jobs on the floor and on this prototype with each thread count, one after the
    other, on the same image (run as root)."""
    import subprocess
    import tempfile

    from benchmarks.fio import FIO_JOBS, run_fio

    def serve(cmd: list[str], mnt: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(mnt, "disk")):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[3]} did not mount")
            time.sleep(0.05)
        return p

    sides = [("floor", None), *((f"threads={n}", n) for n in counts)]
    results: dict[str, list[str]] = {}
    for name, n in sides:
        mnt = tempfile.mkdtemp(prefix="rawfuse-")
        mod = "benchmarks.floorfs" if n is None else "benchmarks.rawfuse"
        cmd = [sys.executable, "-m", mod, image, mnt, *([] if n is None else [str(n)])]
        p = serve(cmd, mnt)
        try:
            for job in FIO_JOBS:
                r = run_fio(job, os.path.join(mnt, "disk"), 4, 1)
                results.setdefault(job.name, []).append(f"{r.figure(job):,.1f}")
                print(f"{name:10} {job.name:28} {r.figure(job):10,.1f} {job.figure}", flush=True)
        finally:
            subprocess.run(["umount", mnt], check=False)
            p.wait(timeout=30)
            os.rmdir(mnt)
    print("| fio job | " + " | ".join(name for name, _ in sides) + " |")
    print("|---|" + "--:|" * len(sides))
    for job in FIO_JOBS:
        print(f"| {job.name} | " + " | ".join(results[job.name]) + " |")


def main() -> int:
    if sys.argv[1] == "--bench":
        bench(sys.argv[2], [int(x) for x in sys.argv[3:]] or [1, 2, 4])
        return 0
    image, mountpoint = sys.argv[1:3]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    RawFuse(image, mountpoint, threads).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
