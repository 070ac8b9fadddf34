"""blockfs: virtual block devices (raw, qcow2, ...) exposed as plain files through FUSE."""

__version__ = "0.1.0"


def _import_trio_without_ldconfig() -> None:
    """Import trio with its one slow step short-cut.

    At import, trio looks for libpthread with ``ctypes.util.find_library``, which runs
    ``ldconfig -p`` in a child process: 0.45 s here, paid by every ``blockfs`` command and by
    the daemon's start. On Linux the soname is known (with glibc 2.34 and later it is a stub
    whose lookups reach libc); where it is absent trio's own fallback runs (thread names only).
    """
    import ctypes.util
    import sys

    if "trio" in sys.modules or not sys.platform.startswith("linux"):
        return
    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return "libpthread.so.0" if name == "pthread" else real(name)

    ctypes.util.find_library = find_library
    try:
        import trio  # noqa: F401
    finally:
        ctypes.util.find_library = real


_import_trio_without_ldconfig()
