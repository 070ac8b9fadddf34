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
#: the ssh properties an ``ssh://`` image takes as options (folded into its location)
SSH_KEYS = {
    "host", "port", "user", "path", "identity", "identity-passphrase-file", "password-file",
    "host-key-check", "timeout",
}  # fmt: skip
#: the gluster properties a ``gluster://`` image takes as options (``server`` may repeat)
GLUSTER_KEYS = {"server", "debug", "logfile", "timeout"}


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
        name = os.path.basename(path.split("?")[0].rstrip("/"))
    check_name(name)
    from blockfs.nodes.protocols import scheme_of

    scheme = scheme_of(path) or ""
    ssh = scheme == "ssh"
    gluster = scheme.startswith("gluster")
    known = SPEC_KEYS | (SSH_KEYS if ssh else GLUSTER_KEYS if gluster else set())
    options: dict[str, str] = {}
    servers: list[str] = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise UsageError(f"{text!r}: option {opt!r} is not key=value")
        if key not in known:
            raise UsageError(
                f"{text!r}: unknown option {key!r} (known: {', '.join(sorted(known))})"
            )
        if gluster and key == "server":
            servers.append(value)  # one more volfile server each time
            continue
        if key in options:
            raise UsageError(f"{text!r}: option {key!r} given twice")
        options[key] = value
    # A remote image's properties travel in the location itself (to the backing files found
    # on the same host or volume too).
    if ssh:
        from blockfs.nodes import ssh as ssh_node

        props = {k: options.pop(k) for k in list(options) if k in SSH_KEYS}
        path = ssh_node.fold_properties(path, props)
    elif gluster:
        from blockfs.nodes import gluster as gluster_node

        gprops = {k: [options.pop(k)] for k in list(options) if k in GLUSTER_KEYS}
        if servers:
            gprops["server"] = servers
        path = gluster_node.fold_properties(path, gprops)
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


