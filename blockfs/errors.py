"""The one exception tree of blockfs.

Every error raised inside blockfs derives from :class:`BlockfsError` and carries an errno, so
that ``fs.py`` (the only place that raises ``pyfuse3.FUSEError``) and the CLI (the only place
that prints to a user) can translate it without guessing::

    BlockfsError(errno)
     +-- UsageError          a user mistake on the command line or in a spec (EINVAL, ENOENT, ...)
     +-- ImageError          an image that is corrupt, hostile or uses an unsupported feature
     |    +-- UnsupportedFeature
     +-- ReadOnlyError       a write to something opened read-only (EROFS)
     +-- NoSpaceError        a write past the end of a virtual disk (ENOSPC)
     +-- JobError            a job verb or spec refused (EBUSY, EINVAL, ...)

``str(exc)`` is always one line fit to show a user.
"""

from __future__ import annotations

import errno as _errno


class BlockfsError(Exception):
    """Base of every blockfs error; ``errno`` says how it crosses into FUSE or an exit code."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    def __str__(self) -> str:
        if not self.args:
            return type(self).__name__
        # One line, and nothing a terminal would act on: names from hostile images and specs
        # (a backing file name, a job id) end up in these messages.
        text = " ".join(str(self.args[0]).split())
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class UsageError(BlockfsError):
    errno = _errno.EINVAL


class ImageError(BlockfsError):
    """The image cannot be used as it is: corrupt, hostile, or not what it claims to be."""

    errno = _errno.EIO


class UnsupportedFeature(ImageError):
    errno = _errno.ENOTSUP


class ReadOnlyError(BlockfsError):
    errno = _errno.EROFS


class NoSpaceError(BlockfsError):
    errno = _errno.ENOSPC


class JobError(BlockfsError):
    errno = _errno.EINVAL
