"""Text from outside (clerk ids, driver messages) made safe to store, match and show.

A clerk id is matched byte for byte, so it is refused, never cleaned, when it holds
characters that would make that ambiguous or unsafe on a terminal: control and format
characters (escape codes, newlines, bidi overrides), line separators, surrounding
spaces. Text already stored is escaped, not trusted, when it is shown.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_CLERK_ID", "clerk_id_problem", "has_control", "printable"]

#: Longest clerk id byod stores (the column's width).
MAX_CLERK_ID = 255
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control, format or line-separator character."""
    if text.isascii():  # the common case, without a look-up per character
        return not text.isprintable()
    return any(_unsafe(char) for char in text)


def printable(text: str) -> str:
    """``text`` with every control, format or separator character written as an escape
    (``\\x1b``, ``\\n``, ``\\u202e``), so it cannot move a terminal's cursor or colour."""
    if not has_control(text):
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if _unsafe(char) else char for char in text
    )


def clerk_id_problem(clerk_id: str) -> str | None:
    """Why ``clerk_id`` cannot be registered, or None when it can.

    All-ASCII-digit clerk ids are refused because a ``USER`` argument of digits is a
    byod id: allowing them would make one reference name two users.
    """
    if not clerk_id:
        return "the clerk id must not be empty"
    if len(clerk_id) > MAX_CLERK_ID:
        return f"the clerk id is longer than {MAX_CLERK_ID} characters"
    if clerk_id != clerk_id.strip():
        return "the clerk id must not start or end with spaces (it is matched exactly)"
    if has_control(clerk_id):
        return "the clerk id must not hold control characters (newlines, escape codes)"
    if clerk_id.isascii() and clerk_id.isdigit():
        return "the clerk id must not be all digits (a USER of digits is a byod user id)"
    return None
