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
        if not isinstance(obj, dict):
            raise UsageError("a JSON spec must be one object")
        items = []
        for k, v in obj.items():
            if isinstance(v, bool):
                v = "on" if v else "off"
            elif isinstance(v, (int, str)):
                v = str(v)
            else:
                raise UsageError(f"{k}: expected a string, number or boolean")
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
            raise UsageError(f"unknown key {k!r} (known: {', '.join(sorted(allowed))})")
        if k in words:
            raise UsageError(f"key {k!r} given twice")
        words[k] = v
    return words


def choice(words: dict[str, str], key: str, options: Iterable[str], default: str) -> str:
    value = words.get(key, default)
    options = list(options)
    if value not in options:
        raise UsageError(f"{key}={value}: expected one of {', '.join(options)}")
    return value


def size_value(words: dict[str, str], key: str, default: int = 0) -> int:
    return parse_size(words[key], key) if key in words else default


def bool_value(words: dict[str, str], key: str, default: bool = False) -> bool:
    return parse_bool(key, words[key]) if key in words else default


def job_id(words: dict[str, str], default: str) -> str:
    return check_name(words.get("id", default), "job id")
