"""The image file as ``blockfs check`` reads and repairs it: plain ``pread``/``pwrite`` on a
descriptor, outside the node stack (a checker must see the bytes as they are, not through a
format node that refuses what it finds broken). Shared by the qcow2 and the VHDX checkers.
"""

from __future__ import annotations

import os

from blockfs.errors import ImageError

_ZEROES = bytes(1024 * 1024)


class CheckIo:
    """Reads past the file's end read zeroes (as QEMU's do). A failed read raises
    :class:`ImageError`; a failed write, extension or flush raises ``write_error`` (the qcow2
    checker's CheckFailed: the check could not complete)."""

    def __init__(
        self,
        fd: int,
        where: str,
        *,
        writable: bool = True,
        write_error: type[ImageError] = ImageError,
    ) -> None:
        self.fd = fd
        self.where = where
        self.writable = writable
        self._write_error = write_error
        self.size = os.lseek(fd, 0, os.SEEK_END)  # (a block device's st_size is 0)

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        parts = []
        got = 0
        try:
            while got < length and offset + got < self.size:
                chunk = os.pread(self.fd, length - got, offset + got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except OSError as exc:
            raise ImageError(f"{self.where}: read at {offset:#x}: {exc.strerror}") from None
        if got < length:
            parts.append(bytes(length - got))
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        assert self.writable
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as exc:
            raise self._write_error(f"{self.where}: write at {offset:#x}: {exc.strerror}") from None
        self.size = max(self.size, offset + len(data))

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(len(_ZEROES), end - offset)
            self.write(offset, _ZEROES[:n])
            offset += n

    def extend(self, size: int) -> None:
        if size > self.size:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                raise self._write_error(f"{self.where}: extend to {size}: {exc.strerror}") from None
            self.size = size

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise self._write_error(f"{self.where}: flush: {exc.strerror}") from None
