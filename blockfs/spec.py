"""Image specs on the command line: ``NAME=PATH[,key=value...]`` or a bare ``PATH``.

Everything here is checked before anything is opened or mounted, so a typo costs one line of
error and leaves no trace.
"""

from __future__ import annotations

import math
import os
import unicodedata
from dataclasses import dataclass

from blockfs.errors import UsageError

SPEC_KEYS = {"format", "read-only", "backing-dirs", "inject"}
#: the largest size any option or spec may name (a disk of 2^63 bytes is not a disk)
MAX_SIZE = (1 << 63) - 1
_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


@dataclass(frozen=True)
class ImageSpec:
    name: str
    path: str
    format: str | None = None
    read_only: bool = False
    #: folders whose files a probed image may use as backing files (``backing-dirs=A:B``)
    backing_dirs: tuple[str, ...] = ()
    #: an error-injection filter under the image's format node (``inject=on``; for tests)
    inject: bool = False


def check_name(name: str, what: str = "image name") -> str:
    """:raise UsageError: a name that cannot be a file name under the mountpoint."""
    if not name:
        raise UsageError(f"empty {what}")
    if "/" in name:
        raise UsageError(f"{what} {name!r} must not contain '/'")
    if any(unicodedata.category(ch) in _UNPRINTABLE for ch in name):
        raise UsageError(f"{what} {name!r} must not contain control or invisible characters")
    if name.startswith("."):
        raise UsageError(f"{what} {name!r} must not start with '.'")
    if "@" in name:
        raise UsageError(f"{what} {name!r} must not contain '@' (kept for backup views)")
    if len(name.encode()) > 255:
        raise UsageError(f"{what} {name[:20]!r}... is longer than 255 bytes")
    return name


#: Unicode categories refused in names: controls (ESC, CR, NUL...), format characters (bidi
#: overrides that make a name print as another), surrogates, line and paragraph separators
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def parse_bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UsageError(f"{key}={value}: expected on or off")


def parse_image_spec(text: str) -> ImageSpec:
    """Parse one spec. ``,,`` stands for a comma inside the path.

    :raise UsageError: empty spec, bad name, unknown or repeated key.
    """
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    head, opts = parts[0], parts[1:]
    name, sep, path = head.partition("=")
    if not sep or "/" in name:  # a bare path (which may itself hold '=')
        name, path = "", head
    if not path:
        raise UsageError(f"{text!r}: no image path")
    if not name:
        name = os.path.basename(path.rstrip("/"))
    check_name(name)
    options: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UsageError(f"{text!r}: option {opt!r} is not key=value")
        if key not in SPEC_KEYS:
            raise UsageError(
                f"{text!r}: unknown option {key!r} (known: {', '.join(sorted(SPEC_KEYS))})"
            )
        if key in options:
            raise UsageError(f"{text!r}: option {key!r} given twice")
        options[key] = value
    fmt = options.get("format")
    read_only = parse_bool("read-only", options["read-only"]) if "read-only" in options else False
    dirs: tuple[str, ...] = ()
    if "backing-dirs" in options:
        dirs = tuple(os.path.abspath(d) for d in options["backing-dirs"].split(":") if d)
        for d in dirs:
            if not os.path.isdir(d):
                raise UsageError(f"{text!r}: backing-dirs: {d} is not a directory")
    inject = parse_bool("inject", options["inject"]) if "inject" in options else False
    return ImageSpec(
        name=name, path=path, format=fmt, read_only=read_only, backing_dirs=dirs, inject=inject
    )


def parse_image_specs(texts: list[str]) -> list[ImageSpec]:
    """:raise UsageError: any bad spec, no spec at all, or two images with one name."""
    if not texts:
        raise UsageError("no image given (NAME=PATH or PATH)")
    specs = [parse_image_spec(t) for t in texts]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise UsageError(f"two images named {s.name!r}; give them names: NAME=PATH")
        seen.add(s.name)
    return specs


_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str, what: str = "size") -> int:
    """``4096``, ``64K``, ``10G``, ``1.5M`` (binary units). :raise UsageError:"""
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text else ""
    unit = t[-1:] if t[-1:] in _SUFFIXES and t[-1:].isalpha() else ""
    number = t[: len(t) - len(unit)] if unit else t
    shown = text if len(text) <= 40 else text[:37] + "..."
    if len(number) > 40:  # int() of thousands of digits is slow; no size has that many
        raise UsageError(f"{what} {shown!r} is not a size (e.g. 4096, 64K, 10G)")
    try:
        value = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise UsageError(f"{what} {shown!r} is not a size (e.g. 4096, 64K, 10G)") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{what} {shown!r} is not a size (e.g. 4096, 64K, 10G)")
    scaled = value * _SUFFIXES[unit]
    if scaled > MAX_SIZE:
        raise UsageError(f"{what} {shown!r} is larger than 2^63 bytes")
    result = int(scaled)
    if result < 0 or (isinstance(value, float) and result != scaled):
        raise UsageError(f"{what} {shown!r} is not a whole number of bytes")
    return result
