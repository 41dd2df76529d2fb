"""Text the client prints: file names and server messages escaped onto one line."""

from __future__ import annotations

import unicodedata

# bidirectional overrides and isolates: a name using them can read backwards on screen
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ESCAPED_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control characters, line separators, bidi overrides and undecodable
    bytes escaped, so that any name the OS allows prints on one line and cannot move the
    cursor or fake another line. A byte that is not UTF-8 reaches Python as a surrogate
    escape (os.fsdecode) and prints as `\\xff`. Everything else, accents and emoji too,
    is kept as it is."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _BIDI or unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
