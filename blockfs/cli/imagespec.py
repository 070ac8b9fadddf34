"""Image specs on the command line: ``NAME=PATH[,key=value...]`` or a bare ``PATH``.

Everything here is checked before anything is opened or mounted, so a typo costs one line of
error and leaves no trace.
"""

from __future__ import annotations

import os

from blockfs.config import ImageSpec
from blockfs.errors import UsageError
from blockfs.values import check_name, parse_bool

SPEC_KEYS = {"format", "read-only", "backing-dirs", "inject"}


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


