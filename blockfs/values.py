"""Values that users write, checked once: names, booleans, sizes, and ``key=value`` specs.

Everything written to a control file or given on the command line is hostile until it passed
here: unknown keys, repeated keys, values of the wrong kind, control characters in names,
numbers no disk could have and oversized input are refused with one-line errors and EINVAL,
before anything is opened. Every layer may use this module; it imports nothing of blockfs but
the errors.
"""

from __future__ import annotations

import json
import math
import shlex
import unicodedata
from collections.abc import Iterable

from blockfs.errors import UsageError

#: the largest size any option or spec may name (a disk of 2^63 bytes is not a disk)
MAX_SIZE = (1 << 63) - 1
_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


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


MAX_SPEC_BYTES = 64 * 1024


def spec_text(text: bytes | str, what: str = "spec") -> str:
    """What was written to a control file, as text: at most :data:`MAX_SPEC_BYTES`, UTF-8,
    no NUL byte, no lone surrogate. :raise UsageError:"""
    if isinstance(text, bytes):
        if len(text) > MAX_SPEC_BYTES:
            raise UsageError(f"{what} longer than {MAX_SPEC_BYTES} bytes")
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise UsageError(f"{what} is not UTF-8 text") from None
    _check_text(text, what)
    return text


def parse_words(text: bytes | str, allowed: Iterable[str]) -> dict[str, str]:
    """Parse a spec into a dict of strings. :raise UsageError:"""
    text = spec_text(text).strip()
    if not text:
        raise UsageError("empty spec (write key=value words or a JSON object)")
    allowed = set(allowed)
    words: dict[str, str] = {}
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"spec is not valid JSON: {exc.msg} at char {exc.pos}") from None
        except RecursionError:  # hostile nesting, [[[[...]]]]
            raise UsageError("spec is nested too deeply") from None
        except ValueError:  # an integer of thousands of digits (int's digit limit)
            raise UsageError("spec holds a number too long to be a value") from None
        if not isinstance(obj, dict):
            raise UsageError("a JSON spec must be one object")
        items = []
        for k, v in obj.items():
            _check_text(k, "key")
            if isinstance(v, bool):
                v = "on" if v else "off"
            elif isinstance(v, int) and abs(v) < 1 << 64:
                v = str(v)
            elif isinstance(v, str):
                _check_text(v, f"{k[:40]!r}")
            else:
                raise UsageError(f"{k[:40]!r}: expected a string, a whole number or a boolean")
            items.append((k, v))
    else:
        try:
            tokens = shlex.split(text)
        except ValueError as exc:
            raise UsageError(f"spec: {exc}") from None
        items = []
        for tok in tokens:
            k, sep, v = tok.partition("=")
            if not sep:
                raise UsageError(f"{tok!r} is not key=value")
            items.append((k, v))
    for k, v in items:
        if k not in allowed:
            shown = k if len(k) <= 40 else k[:37] + "..."
            raise UsageError(f"unknown key {shown!r} (known: {', '.join(sorted(allowed))})")
        if k in words:
            raise UsageError(f"key {k!r} given twice")
        words[k] = v
    return words


def _check_text(text: str, what: str) -> None:
    """:raise UsageError: a NUL byte (no path or name may hold one) or a lone surrogate (JSON
    can spell one; it is not text and cannot be encoded)."""
    if "\0" in text:
        raise UsageError(f"{what} holds a NUL byte")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} holds a lone surrogate (not text)") from None


def choice(words: dict[str, str], key: str, options: Iterable[str], default: str) -> str:
    value = words.get(key, default)
    options = list(options)
    if value not in options:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise UsageError(f"{key}={shown}: expected one of {', '.join(options)}")
    return value


def size_value(words: dict[str, str], key: str, default: int = 0) -> int:
    return parse_size(words[key], key) if key in words else default


def bool_value(words: dict[str, str], key: str, default: bool = False) -> bool:
    return parse_bool(key, words[key]) if key in words else default


def job_id(words: dict[str, str], default: str) -> str:
    return check_name(words.get("id", default), "job id")
