"""Job specs as written to ``MNT/.control/jobs/KIND``: ``key=value`` words or one JSON object.

Every spec is hostile until checked: unknown keys, repeated keys, values of the wrong kind and
oversized input are refused here with one-line errors and EINVAL, before anything is opened.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable

from blockfs.errors import UsageError
from blockfs.spec import check_name, parse_bool, parse_size

MAX_SPEC_BYTES = 64 * 1024


def parse_words(text: bytes | str, allowed: Iterable[str]) -> dict[str, str]:
    """Parse a spec into a dict of strings. :raise UsageError:"""
    if isinstance(text, bytes):
        if len(text) > MAX_SPEC_BYTES:
            raise UsageError(f"spec longer than {MAX_SPEC_BYTES} bytes")
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise UsageError("spec is not UTF-8 text") from None
    _check_text(text, "spec")
    text = text.strip()
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
