"""Text from files (adaptor names, metadata, file names) made safe to print on a terminal.

A file can name itself ``"nice\\x1b[2J"`` or ``"a\\nerror: b"``; printed raw, that clears the screen or forges a
line. :func:`escape` turns every character that is not printable into a visible escape, so one value is one line
and the terminal only ever receives printable text.
"""

from __future__ import annotations

import os
from pathlib import Path

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)  # os.fsdecode's stand-ins for undecodable bytes 0x80-0xff


def escape(text: str) -> str:
    """``text`` with each non-printable character (controls such as ESC and newline, bidi overrides, zero-width
    and other format characters, undecodable file-name bytes) written as a backslash escape.

    Printable text, including non-ASCII letters, is unchanged; applying it twice changes nothing more.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a message: :func:`escape` of its text (a non-UTF-8 byte shows as ``\\xff``)."""
    return escape(str(Path(path)))


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code in _SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
