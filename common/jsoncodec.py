"""JSON encoding in one place, on orjson: bytes out, strict UTF-8 in."""

from __future__ import annotations

import reprlib
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError

#: Deepest nesting accepted from outside (REST bodies, Pub/Sub messages). orjson
#: decodes up to 1024 levels but encodes at most 254, so a deeper value would be
#: accepted and then fail when it is written to a stream, a mailbox or a socket.
MAX_INPUT_DEPTH = 64

_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel = 3
_PREVIEW.maxstring = 80
_PREVIEW.maxother = 80


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def too_deep(value: Any, limit: int = MAX_INPUT_DEPTH) -> bool:
    """Whether a decoded JSON value nests containers more than ``limit`` levels."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            children: Any = current.values()
        elif isinstance(current, list):
            children = current
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def preview(value: Any, limit: int = 80) -> str:
    """Bounded text of any decoded JSON value for error messages (never recursive)."""
    text = value if isinstance(value, str) else _PREVIEW.repr(value)
    return text[:limit]
