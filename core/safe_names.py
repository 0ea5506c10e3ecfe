"""Values from the data that become file names or appear in messages.

A `video_uid` or a dataset name is used to build paths (`{root}/{dataset}/frames/{name}.arrow`) and printed in
one-line messages. `name_problem` says why a value cannot be a single path component, so that no value in the data
can make a command read or write outside its folders; `shown` makes any value safe for a one-line message.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_BYTES = 200  # file systems limit a name to 255 bytes; leaves room for suffixes such as ".arrow.tmp"
MAX_SHOWN = 80  # characters of a value quoted in a message


def _unprintable(ch: str) -> bool:
    # Cc: control characters (newlines, NUL, ...); Cs: lone surrogates (valid JSON escapes, not valid UTF-8).
    return unicodedata.category(ch) in ("Cc", "Cs")


def name_problem(value: str) -> str | None:
    """Why `value` cannot be used as one path component, or None when it can."""
    if not value.strip():
        return "is empty"
    if value in (".", ".."):
        return f"is {value!r}, not a file name"
    for bad in ("/", "\\"):
        if bad in value:
            return f"contains {bad!r} (a path separator)"
    if any(_unprintable(ch) for ch in value):
        return "contains control characters or invalid Unicode"
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def shown(name: str, limit: int = MAX_SHOWN) -> str:
    """A name (a video_uid, a key) for a one-line message: as it is when printable, else its repr; cut to `limit`."""
    return _cut(name if not any(_unprintable(ch) for ch in name) else repr(name), limit)


def quoted(value: object, limit: int = MAX_SHOWN) -> str:
    """A value from the data for a one-line message: the repr of a string or number, a list or object by its size
    (the repr of deeply nested JSON could itself fail); cut to `limit` characters."""
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return _cut(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
