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
     +-- TransientError      a remote failed in a way a new connection may cure (ECONNRESET, ...)

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


#: errnos that say the way to the storage broke, not the storage: a reconnect may cure them
TRANSIENT_ERRNOS = frozenset(
    {
        _errno.EAGAIN,
        _errno.ECONNABORTED,
        _errno.ECONNREFUSED,
        _errno.ECONNRESET,
        _errno.EHOSTUNREACH,
        _errno.ENETDOWN,
        _errno.ENETRESET,
        _errno.ENETUNREACH,
        _errno.ENOTCONN,
        _errno.EPIPE,
        _errno.ESHUTDOWN,
        _errno.ETIMEDOUT,
    }
)


class TransientError(BlockfsError):
    """The request failed on the way to the storage (a connection reset, a timeout), not in
    it: the same request, sent again after :meth:`blockfs.nodes.base.Node.reconnect`, may
    succeed. Only a protocol node raises it, and only when sending the request again is safe;
    :class:`blockfs.nodes.retry.RetryFilter` acts on it. ``errno`` is the original one
    (ECONNRESET, ETIMEDOUT, ...; EAGAIN when there was none).

    ``reached``: the request may have reached the storage before the error (its reply was
    lost). A write sent again is harmless then (same bytes, same place, not yet acknowledged);
    a flush is not: the storage may have reported a write-back error to the lost reply, and
    it reports such an error only once, so a retried flush could succeed over lost data.
    """

    errno = _errno.EAGAIN

    def __init__(self, message: str, *, errno: int | None = None, reached: bool = True) -> None:
        super().__init__(message, errno=errno)
        self.reached = reached


def is_transient_errno(code: int | None) -> bool:
    """Does ``code`` (an ``OSError.errno``) say the connection failed, not the storage?"""
    return code in TRANSIENT_ERRNOS
