"""Structural mutation of qcow2 images, for the fuzzer (``test_fuzz_qcow2.py``).

A seed image (made by qemu-img) is described by a :class:`Layout`: where its header fields,
tables, snapshot entries, header extensions, backing file name and compressed clusters lie. A
mutant is the seed plus a list of *operations* (plain tuples, so that a found case can be
written down as a regression example). Operations name what they change structurally (a header
field by name, the k-th entry of an L2 table, ...) and are resolved against the seed's layout
when applied, so an example stays meaningful when qemu-img lays the seed out differently.
Indexes wrap around (modulo the count), so any integer is valid.

Values are ints, or symbolic:

- ``("at", anchor, delta, flags)``: the host offset of a structure of the seed (``hdr``, ``l1``,
  ``rt``, ``rb``, ``l2``, ``snap``, ``snapl1``, ``cdata``, ``eof``) plus ``delta``, ORed with
  ``flags`` (to make a table entry point into other metadata);
- ``("orig", delta)``: the field's original value plus ``delta``.

Every value is reduced to the field's width. The layout is parsed here, independently of
blockfs's own parser (which is what is under test). Importing this module has no side effects.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

#: header fields by name: (offset, struct format); compression_type exists when header_length
#: is > 104 (v3)
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

#: fields of a snapshot table entry: (offset in the entry, format); extra data at 40
SNAPSHOT_FIELDS: dict[str, tuple[int, str]] = {
    "l1_table_offset": (0, ">Q"),
    "l1_size": (8, ">I"),
    "id_str_size": (12, ">H"),
    "name_size": (14, ">H"),
    "date_sec": (16, ">I"),
    "vm_state_size": (28, ">I"),
    "extra_data_size": (36, ">I"),
    "vm_state_size_large": (40, ">Q"),
    "disk_size": (48, ">Q"),
    "id_bytes": (-1, ""),  # the first byte of the ID string
}

ANCHORS = ("hdr", "l1", "rt", "rb", "l2", "snap", "snapl1", "cdata", "eof")
PAYLOADS = ("random", "zeros", "ones", "zlib-bomb", "zstd-bomb", "truncated-zlib")

COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

Op = tuple[Any, ...]


@dataclass
class Snap:
    entry: int  # file offset of the entry
    l1_off: int
    l1_size: int
    id_off: int  # file offset of the ID string


@dataclass
class Layout:
    """Where the structures of one (valid) seed image lie."""

    size: int  # file size
    version: int
    cluster_bits: int
    refcount_order: int
    header: dict[str, int]
    l1_off: int
    l1_size: int
    rt_off: int
    rt_entries: int
    l2_tables: list[int] = field(default_factory=list)
    refblocks: list[int] = field(default_factory=list)
    snaps: list[Snap] = field(default_factory=list)
    #: (file offset of the extension's type field, type)
    extensions: list[tuple[int, int]] = field(default_factory=list)
    backing: tuple[int, int] = (0, 0)  # offset, length of the backing file name
    #: (file offset of the L2 entry, of the data, length) of each compressed cluster
    compressed: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def parse(cls, data: bytes) -> Layout:
        f = HEADER_FIELDS
        hdr = {
            name: struct.unpack_from(fmt, data, off)[0]
            for name, (off, fmt) in f.items()
            if off + struct.calcsize(fmt) <= 104 or data[4:8] == b"\0\0\0\x03"
        }
        version = hdr["version"]
        cb = hdr["cluster_bits"]
        cs = 1 << cb
        order = hdr["refcount_order"] if version == 3 else 4
        lay = cls(
            size=len(data),
            version=version,
            cluster_bits=cb,
            refcount_order=order,
            header=hdr,
            l1_off=hdr["l1_table_offset"],
            l1_size=hdr["l1_size"],
            rt_off=hdr["refcount_table_offset"],
            rt_entries=hdr["refcount_table_clusters"] * cs // 8,
        )
        l1 = struct.unpack_from(f">{lay.l1_size}Q", data, lay.l1_off)
        x = 62 - (cb - 8)
        for e in l1:
            l2 = e & OFFSET_MASK
            if not l2:
                continue
            lay.l2_tables.append(l2)
            for i, e2 in enumerate(struct.unpack_from(f">{cs // 8}Q", data, l2)):
                if e2 & COMPRESSED:
                    coff = e2 & ((1 << x) - 1)
                    nsec = ((e2 >> x) & ((1 << (cb - 8)) - 1)) + 1
                    lay.compressed.append((l2 + 8 * i, coff, nsec * 512 - (coff & 511)))
        for e in struct.unpack_from(f">{lay.rt_entries}Q", data, lay.rt_off):
            if e:
                lay.refblocks.append(e & ~0x1FF)
        pos = hdr["snapshots_offset"]
        for _ in range(hdr["nb_snapshots"]):
            l1o, l1s, idl, nml, _s, _n, _c, _v, exl = struct.unpack_from(">QIHHIIQII", data, pos)
            lay.snaps.append(Snap(pos, l1o, l1s, pos + 40 + exl))
            pos += 40 + exl + idl + nml
            pos += -pos % 8
        hlen = hdr["header_length"] if version == 3 else 72
        pos = hlen
        while pos + 8 <= cs:
            etype, elen = struct.unpack_from(">II", data, pos)
            if etype == 0:
                break
            lay.extensions.append((pos, etype))
            pos += 8 + elen + (-elen % 8)
        if hdr["backing_file_offset"]:
            lay.backing = (hdr["backing_file_offset"], hdr["backing_file_size"])
        return lay

    def anchor(self, name: str) -> int:
        """The host offset of the first structure of a kind (the end of file for ``eof``, and
        the header when the seed has none of that kind)."""
        firsts = {
            "hdr": 0,
            "l1": self.l1_off,
            "rt": self.rt_off,
            "rb": self.refblocks[0] if self.refblocks else 0,
            "l2": self.l2_tables[0] if self.l2_tables else 0,
            "snap": self.snaps[0].entry if self.snaps else 0,
            "snapl1": self.snaps[0].l1_off if self.snaps else 0,
            "cdata": self.compressed[0][1] if self.compressed else 0,
            "eof": self.size,
        }
        return firsts[name]


def _value(lay: Layout, v: Any, orig: int, width: int) -> int:
    if isinstance(v, tuple):
        if v[0] == "at":
            _, anchor, delta, flags = v
            n = (lay.anchor(anchor) + delta) | flags
        elif v[0] == "orig":
            n = orig + v[1]
        else:
            raise ValueError(f"unknown value {v!r}")
    else:
        n = int(v)
    return n & ((1 << (8 * width)) - 1)


def _poke(buf: bytearray, lay: Layout, off: int, fmt: str, v: Any) -> None:
    """Replace the field of format ``fmt`` at ``off`` (skipped when it lies outside)."""
    width = struct.calcsize(fmt)
    if off < 0 or off + width > len(buf):
        return
    orig = struct.unpack_from(fmt, buf, off)[0]
    struct.pack_into(fmt, buf, off, _value(lay, v, orig, width))


def _pick(items: list[Any], k: int) -> Any:
    return items[k % len(items)] if items else None


def payload(kind: str, length: int, seed: int) -> bytes:
    """Bytes to put in place of a compressed cluster's data."""
    if kind == "random":
        return random.Random(seed).randbytes(length)
    if kind == "zeros":
        return bytes(length * 4)
    if kind == "ones":
        return b"\xff" * (length * 4)
    if kind == "zlib-bomb":
        z = zlib.compressobj(9, zlib.DEFLATED, -12)
        return (z.compress(bytes(64 << 20)) + z.flush())[:length]
    if kind == "zstd-bomb":
        import zstandard

        return zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))[:length]
    if kind == "truncated-zlib":
        z = zlib.compressobj(6, zlib.DEFLATED, -12)
        return (z.compress(random.Random(seed).randbytes(1 << 16)) + z.flush())[: length // 2]
    raise ValueError(f"unknown payload {kind!r}")


def apply(data: bytes, lay: Layout, ops: list[Op]) -> bytes:
    """The seed ``data`` with ``ops`` applied in order (see the module docstring)."""
    buf = bytearray(data)
    cs = lay.cluster_size
    for op in ops:
        kind = op[0]
        if kind == "hdr":
            off, fmt = HEADER_FIELDS[op[1]]
            _poke(buf, lay, off, fmt, op[2])
        elif kind == "l1" and lay.l1_size:
            _poke(buf, lay, lay.l1_off + 8 * (op[1] % lay.l1_size), ">Q", op[2])
        elif kind == "l2" and lay.l2_tables:
            _poke(buf, lay, _pick(lay.l2_tables, op[1]) + 8 * (op[2] % (cs // 8)), ">Q", op[3])
        elif kind == "rt":
            _poke(buf, lay, lay.rt_off + 8 * (op[1] % max(1, lay.rt_entries)), ">Q", op[2])
        elif kind == "rb" and lay.refblocks:
            bits = 1 << lay.refcount_order
            block = _pick(lay.refblocks, op[1])
            i = op[2] % (cs * 8 // bits)
            if bits >= 8:
                _poke(
                    buf,
                    lay,
                    block + i * bits // 8,
                    {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}[bits],
                    op[3],
                )
            else:
                byte = block + i * bits // 8
                sh = i * bits % 8
                mask = ((1 << bits) - 1) << sh
                v = _value(lay, op[3], 0, 8) & ((1 << bits) - 1)
                buf[byte] = (buf[byte] & ~mask) | (v << sh)
        elif kind == "snap" and lay.snaps:
            s = _pick(lay.snaps, op[1])
            off, fmt = SNAPSHOT_FIELDS[op[2]]
            if op[2] == "id_bytes":
                _poke(buf, lay, s.id_off, ">B", op[3])
            else:
                _poke(buf, lay, s.entry + off, fmt, op[3])
        elif kind == "snapl1" and lay.snaps:
            s = _pick(lay.snaps, op[1])
            if s.l1_size:
                _poke(buf, lay, s.l1_off + 8 * (op[2] % s.l1_size), ">Q", op[3])
        elif kind == "ext" and lay.extensions:
            pos, _ = _pick(lay.extensions, op[1])
            _poke(buf, lay, pos + (0 if op[2] == "type" else 4), ">I", op[3])
        elif kind == "backing" and lay.backing[0] and sum(lay.backing) <= len(buf):
            off, n = lay.backing  # (not after a truncation that cut the name or header off)
            name = bytes(op[1])[: cs - off]
            buf[off : off + n] = bytes(n)
            buf[off : off + len(name)] = name
            struct.pack_into(">I", buf, 16, len(name))
        elif kind == "cdata" and lay.compressed:
            # the payload replaces the cluster's data, and the L2 entry's sector count grows
            # to cover as much of it as the format can express
            entry, off, n = _pick(lay.compressed, op[1])
            if entry + 8 > len(buf) or off > len(buf):
                continue  # cut off by a truncation
            cb = lay.cluster_bits
            x = 62 - (cb - 8)
            most = (1 << (cb - 8)) * 512 - (off & 511)
            p = payload(op[2], n, op[1])[:most]
            buf[off : off + len(p)] = p
            nsec = (len(p) + (off & 511) + 511) // 512
            e = COMPRESSED | ((max(1, nsec) - 1) << x) | off
            struct.pack_into(">Q", buf, entry, e)
        elif kind == "bytes":
            off = op[1] % max(1, len(buf))
            b = bytes(op[2])[: len(buf) - off]
            buf[off : off + len(b)] = b
        elif kind == "flip" and buf:
            off = op[1] % len(buf)
            buf[off] ^= op[2] & 0xFF or 1
        elif kind == "truncate":
            del buf[op[1] % max(1, len(buf)) :]
        elif kind == "extend":
            buf.extend(bytes([op[2] & 0xFF]) * op[1])
    return bytes(buf)
