"""The inspecting commands of the ``blockfs`` CLI: ``info`` and ``map``, shaped as qemu-img's.

Both open the image read-only (any format and protocol blockfs opens) and print what
:mod:`blockfs.info` and :mod:`blockfs.mapping` make of it, as JSON or in qemu-img's human form.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio

from blockfs.cli.images import format_snapshots, human_size
from blockfs.info import chain_info
from blockfs.mapping import map_human, map_image, map_json

_INFO_EXAMPLES = """\
examples:
  blockfs info disk.qcow2
  blockfs info --backing-chain --output json top.qcow2 | jq '.[].filename'
  blockfs info 'ssh://user@host/srv/disk.vhdx'

The JSON has the shape and names of `qemu-img info --output json` (QEMU 7.2); what only
blockfs knows is under the "blockfs" key.
"""

_MAP_EXAMPLES = """\
examples:
  blockfs map disk.qcow2
  blockfs map --output json top.qcow2 | jq '.[] | select(.depth > 0)'

The JSON entries are qemu-img map's: start, length, depth, present, zero, data, offset.
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    i = subparsers.add_parser(
        "info",
        help="show what an image is (qemu-img info's fields)",
        description="Show an image's format, sizes, backing file, snapshots and format-specific "
        "fields, read-only. Works on files, ssh:// and gluster:// locations.",
        epilog=_INFO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("filename", help="the image (a path or a URI)")
    i.add_argument("--backing-chain", action="store_true", help="show every layer of the chain")
    i.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format (human)"
    )
    i.set_defaults(func=cmd_info)

    m = subparsers.add_parser(
        "map",
        help="show where each range of an image is stored (qemu-img map's extents)",
        description="List the image's ranges: which layer of the chain holds each, whether it "
        "reads as zeroes or data, and where the data lies in that layer's file.",
        epilog=_MAP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("filename", help="the image (a path or a URI)")
    m.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format (human)"
    )
    m.set_defaults(func=cmd_map)


# -- info -------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from blockfs.nodes.registry import close_chain, open_image

    async def run() -> list[dict[str, Any]]:
        node = await open_image(args.filename, read_only=True)
        try:
            return await chain_info(node, args.filename)
        finally:
            await close_chain(node)

    layers = trio.run(run)
    if not args.backing_chain:
        layers = layers[:1]
    if args.output == "json":
        doc: object = layers if args.backing_chain else layers[0]
        print(json.dumps(doc, indent=4))
        return 0
    print("\n".join(human_info(layer) for layer in layers), end="")
    return 0


def human_info(d: dict[str, Any]) -> str:
    """One layer as ``qemu-img info`` prints it."""
    out = [
        f"image: {d['filename']}",
        f"file format: {d['format']}",
        f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)",
    ]
    if d.get("actual-size") is not None:
        out.append(f"disk size: {human_size(d['actual-size'])}")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}")
    if d.get("backing-filename"):
        line = f"backing file: {d['backing-filename']}"
        if d.get("full-backing-filename") not in (None, d["backing-filename"]):
            line += f" (actual path: {d['full-backing-filename']})"
        out.append(line)
        if d.get("backing-filename-format"):
            out.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no")
    if d.get("snapshots"):
        out.append(format_snapshots(d["snapshots"]).rstrip("\n"))
    specific = d.get("format-specific")
    if specific and specific.get("data"):
        out.append("Format specific information:")
        out.extend(_tree(specific["data"], 1))
    return "\n".join(out) + "\n\n"


def _tree(value: Any, level: int) -> list[str]:
    """Nested dicts and lists as qemu-img prints them: keys with spaces, lists as ``[i]:``."""
    pad = "    " * level
    lines: list[str] = []
    items = (
        [(f"[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, list)
        else [(str(k).replace("-", " "), v) for k, v in value.items()]
    )
    for key, v in items:
        if isinstance(v, (dict, list)):
            lines.append(f"{pad}{key}:")
            lines.extend(_tree(v, level + 1))
        else:
            text = str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"{pad}{key}: {text}")
    return lines


# -- map --------------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> int:
    from blockfs.nodes.registry import close_chain, open_image

    async def run() -> tuple[list[dict[str, Any]], list[str]]:
        node = await open_image(args.filename, read_only=True)
        try:
            names = [d["filename"] for d in await chain_info(node, args.filename)]
            return await map_image(node), names
        finally:
            await close_chain(node)

    entries, names = trio.run(run)
    if args.output == "json":
        print(map_json(entries), end="")
    else:
        print(map_human(entries, names), end="")
    return 0
