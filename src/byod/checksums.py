"""A migration's checksum: what its code means, not how its file is laid out.

The checksum is SHA-256 over a canonical serialisation of the file's syntax tree, walked
by hand: each node is written as its type and its fields, in order, leaving out what
never changes meaning (line and column numbers, comments and blank lines, which the parser
drops, and what only some Python versions write: the fields ``type_comment``,
``kind``, ``type_ignores``, ``type_params`` when empty, and the empty text parts 3.12
puts in an f-string's format spec). Docstrings are normalised (their words
joined by single spaces). So ``ruff format``, ``black``, comments and blank lines are not
drift; any change to code, or to a string literal (SQL text included), is. The same file
gives the same checksum on Python 3.11, 3.12 and 3.13 (a committed table of samples pins
it: ``tests/checksums/``).

Applied checksums recorded by an older byod are SHA-256 over the file's bytes
(:func:`bytes_checksum`); they stay valid while the file is unchanged.
"""

from __future__ import annotations

import ast
import hashlib

__all__ = ["CHECKSUM_VERSION", "bytes_checksum", "source_checksum"]

#: Bumped only with a change to the serialisation (never for a new Python version).
CHECKSUM_VERSION = 1
#: Fields that differ between Python versions, or hold no meaning.
_LEFT_OUT = frozenset({"type_comment", "kind", "type_ignores"})
#: Fields left out when empty: new syntax of later Pythons, absent before.
_LEFT_OUT_WHEN_EMPTY = frozenset({"type_params"})


def bytes_checksum(source: bytes) -> str:
    """SHA-256 of the file's bytes: the checksum byod recorded before syntax checksums."""
    return hashlib.sha256(source).hexdigest()


def source_checksum(source: bytes) -> str:
    """SHA-256 of the canonical form of ``source``'s syntax tree (see the module's
    docstring). A file that does not parse gets its bytes' checksum (its load reports
    the error)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return bytes_checksum(source)
    out: list[str] = [f"v{CHECKSUM_VERSION}:"]
    _write(tree, out)
    return hashlib.sha256("".join(out).encode()).hexdigest()


def _write(node: object, out: list[str]) -> None:
    if isinstance(node, ast.AST):
        out.append(type(node).__name__)
        out.append("(")
        for name in node._fields:
            if name in _LEFT_OUT:
                continue
            value = getattr(node, name, None)
            if name in _LEFT_OUT_WHEN_EMPTY and not value:
                continue
            if name == "body" and isinstance(value, list):
                value = _with_docstring_normalised(node, value)
            if isinstance(node, ast.JoinedStr) and isinstance(value, list):
                value = [v for v in value if not _empty_text(v)]  # 3.12 adds some
            out.append(f"{name}=")
            _write(value, out)
            out.append(",")
        out.append(")")
    elif isinstance(node, list):
        out.append("[")
        for item in node:
            _write(item, out)
            out.append(",")
        out.append("]")
    else:  # a constant: its type and exact value (a string's every character counts)
        out.append(f"{type(node).__name__}:{node!r}")


def _empty_text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == ""


def _with_docstring_normalised(node: ast.AST, body: list[ast.stmt]) -> list[ast.stmt]:
    """``body`` with its docstring (a module's, class's or function's first statement,
    a string) as its words joined by single spaces."""
    if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return body
    if not body or not isinstance(body[0], ast.Expr):
        return body
    first = body[0].value
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return body
    words = " ".join(first.value.split())
    return [ast.Expr(value=ast.Constant(value=words)), *body[1:]]
