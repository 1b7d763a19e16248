"""Convex values in Python, and their JSON encoding on Convex's wire (``convex_encoded_json``).

The encoding is the one Convex's own JavaScript client writes and reads (``convexToJson``
and ``jsonToConvex`` of ``convex/values``); byod's contract tests hold the two side by side.

=========  =============================  ==============================================
Python     Convex                         JSON
=========  =============================  ==============================================
None       null                           ``null``
bool       boolean                        ``true`` / ``false``
float      float64 (a JS number)          a number; NaN, ±infinity and -0.0 as
                                          ``{"$float": base64 of 8 little-endian bytes}``
int        float64 (a JS number)          a number (encoding only: see below)
Int64      int64 (a JS bigint)            ``{"$integer": base64 of 8 little-endian bytes}``
str        string                         a string
bytes      bytes (a JS ArrayBuffer)       ``{"$bytes": base64}``
list       array                          an array
dict       object                         an object, its fields sorted (see below)
=========  =============================  ==============================================

Fields are sent sorted, as ``convexToJson`` sorts them; JavaScript then lists integer-like
keys ("0", "42") first in the JSON it writes, an order JSON does not give any meaning.

A plain Python ``int`` is sent as a JS number, as Convex's JavaScript functions expect
(``v.number()``) and as Convex's own Python client does: an int that a float64 cannot
hold exactly is refused rather than rounded. A Convex int64 (``v.int64()``) is asked for
explicitly with :class:`Int64`. Decoding gives back a ``float`` for every number and an
:class:`Int64` for every int64, so ``decode(encode(v)) == v`` for every value of the types
in the table (a NaN comes back as a NaN with the same bits; an int as the float equal to
it; a tuple, also accepted, as a list; a bytearray as bytes).

What Convex refuses is refused here, with a :class:`ConvexValueError` that names where in
the value it is, never the value itself: field names that start with ``$``, hold a
character outside printable ASCII or are longer than 1024 characters; an :class:`Int64`
outside int64, an int no float64 holds; strings that are not valid Unicode (lone
surrogates); values nested deeper than Convex's 64 levels; any other Python type. One
more is refused on purpose: a field named ``__proto__``, which Convex's JavaScript drops
without a word. Convex's size limits (a value's size, array and object lengths) are left
to the deployment, which reports them.
"""

from __future__ import annotations

import base64
import binascii
import math
import operator
import struct
from collections.abc import Mapping
from typing import Any, SupportsIndex, TypeAlias

__all__ = [
    "MAX_FIELD_NAME_LENGTH",
    "MAX_INT64",
    "MAX_NESTING",
    "MIN_INT64",
    "ConvexValueError",
    "Int64",
    "JsonValue",
    "Value",
    "decode",
    "encode",
]

MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
#: Longest field name Convex accepts (``MAX_IDENTIFIER_LEN`` of ``convex/values``).
MAX_FIELD_NAME_LENGTH = 1024
#: Deepest value Convex accepts: a list of numbers is nested 1 level, a list of them 2.
MAX_NESTING = 64
#: The only field that JavaScript's ``jsonToConvex`` cannot keep (it sets the prototype).
_PROTO = "__proto__"

#: A value as encoded on the wire: what ``json.dumps`` takes and ``json.loads`` gives.
JsonValue: TypeAlias = Any
#: A Convex value in Python (see the table above).
Value: TypeAlias = Any


class ConvexValueError(ValueError):
    """A value Convex cannot hold (encoding), or a JSON that is not Convex's encoding of
    one (decoding); the message names where in the value (``.field[2]``)."""

    def __init__(self, problem: str, path: str = "") -> None:
        self.problem = problem
        self.path = path
        super().__init__(f"{problem} (at {path})" if path else problem)


class Int64(int):
    """A Convex int64 (a JS bigint): an int from -2**63 to 2**63 - 1, sent as
    ``{"$integer": ...}``. Arithmetic on it gives plain ints, which are sent as numbers."""

    __slots__ = ()

    def __new__(cls, value: SupportsIndex) -> Int64:
        number = operator.index(value)
        if not MIN_INT64 <= number <= MAX_INT64:
            raise ConvexValueError("the int does not fit into a Convex int64 (64-bit signed)")
        return super().__new__(cls, number)

    def __repr__(self) -> str:
        return f"Int64({int(self)})"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _special(number: float) -> bool:
    return (
        math.isnan(number) or math.isinf(number) or (number == 0 and math.copysign(1, number) < 0)
    )


def _field_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"a field name must be a string, not {type(name).__name__}"
    shown = repr(name if len(name) <= 40 else name[:40] + "...")
    if len(name) > MAX_FIELD_NAME_LENGTH:
        return f"field name {shown} is longer than {MAX_FIELD_NAME_LENGTH} characters"
    if name.startswith("$"):
        return f"field name {shown} starts with '$', which Convex reserves"
    if any(not " " <= char <= "~" for char in name):
        return f"field name {shown} holds a character outside printable ASCII"
    if name == _PROTO:
        return f"field name {_PROTO!r} is dropped by Convex's JavaScript (it sets the prototype)"
    return None


def _field_path(path: str, name: str) -> str:
    return f"{path}.{name}"


def encode(value: Value) -> JsonValue:
    """The JSON (``json.dumps``-able) that Convex reads as ``value``: what ``convexToJson``
    gives for the same JavaScript value, every number a float and the fields sorted.
    Raises :class:`ConvexValueError` for what Convex cannot hold."""
    return _encode(value, "", 0)


def _encode(value: Value, path: str, depth: int) -> JsonValue:
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            _check_unicode(value, path)
        return value
    if isinstance(value, Int64):
        return {"$integer": _b64(struct.pack("<q", value))}
    if isinstance(value, int):
        return _int_as_number(value, path)
    if isinstance(value, float):
        if _special(value):
            return {"$float": _b64(struct.pack("<d", value))}
        return value
    if isinstance(value, bytes | bytearray):
        return {"$bytes": _b64(bytes(value))}
    if isinstance(value, list | tuple | dict):
        if depth >= MAX_NESTING:
            raise ConvexValueError(f"the value is nested deeper than {MAX_NESTING} levels", path)
        if isinstance(value, dict):
            return _encode_object(value, path, depth + 1)
        return [_encode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ConvexValueError(f"{type(value).__name__} is not a Convex value", path)


def _check_unicode(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConvexValueError(
            "a string holds a lone surrogate: Convex strings must be valid Unicode", path
        ) from None


def _int_as_number(value: int, path: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if number != value:
        raise ConvexValueError(
            "an int is not exactly a float64 (a JS number): wrap it in Int64() for a Convex "
            "int64, or pass a float to round it",
            path,
        )
    return number


def _encode_object(value: Mapping[Any, Value], path: str, depth: int) -> dict[str, JsonValue]:
    for name in value:
        problem = _field_problem(name)
        if problem is not None:
            raise ConvexValueError(problem, path)
    return {name: _encode(value[name], _field_path(path, name), depth) for name in sorted(value)}


def decode(json_value: JsonValue) -> Value:
    """The Python value of Convex's JSON encoding (as ``json.loads`` gives it), read as
    ``jsonToConvex`` reads it: every number a float, ``$integer`` an :class:`Int64`,
    ``$bytes`` bytes, ``$float`` the special float it holds. Raises
    :class:`ConvexValueError` for what is not Convex's encoding (``$set``, ``$map``, a
    ``$``-field, malformed base64, a ``$float`` that should have been a number)."""
    return _decode(json_value, "", 0)


def _decode(json_value: JsonValue, path: str, depth: int) -> Value:
    if json_value is None or isinstance(json_value, bool | str):
        return json_value
    if isinstance(json_value, int | float):
        return _number(json_value, path)
    if isinstance(json_value, list | dict):
        if depth >= MAX_NESTING:
            raise ConvexValueError(f"the value is nested deeper than {MAX_NESTING} levels", path)
        if isinstance(json_value, list):
            return [_decode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(json_value)]
        if len(json_value) == 1:
            ((name, inner),) = json_value.items()
            if isinstance(name, str) and name.startswith("$"):
                return _decode_special(name, inner, path)
        for name in json_value:
            problem = _field_problem(name)
            if problem is not None:
                raise ConvexValueError(problem, path)
        return {
            name: _decode(inner, _field_path(path, name), depth + 1)
            for name, inner in json_value.items()
        }
    raise ConvexValueError(f"{type(json_value).__name__} is not JSON", path)


def _number(json_value: int | float, path: str) -> float:
    try:
        return float(json_value)
    except OverflowError:
        raise ConvexValueError("a number is beyond the float64 range", path) from None


def _decode_special(name: str, inner: JsonValue, path: str) -> Value:
    if name in ("$set", "$map"):
        raise ConvexValueError(f"{name} (a Set or Map) is no longer a Convex type", path)
    if name not in ("$bytes", "$integer", "$float"):
        problem = _field_problem(name)
        raise ConvexValueError(problem or f"unknown Convex type {name!r}", path)
    if not isinstance(inner, str):
        raise ConvexValueError(f"{name} must hold a base64 string", path)
    data = _unbase64(inner, name, path)
    if name == "$bytes":
        return data
    if len(data) != 8:
        raise ConvexValueError(f"{name} must hold 8 bytes, not {len(data)}", path)
    if name == "$integer":
        return Int64(struct.unpack("<q", data)[0])
    number: float = struct.unpack("<d", data)[0]
    if not _special(number):
        raise ConvexValueError(f"$float {number!r} should have been encoded as a number", path)
    return number


def _unbase64(text: str, name: str, path: str) -> bytes:
    if len(text) % 4:
        raise ConvexValueError(f"{name} holds base64 whose length is not a multiple of 4", path)
    standard = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(standard, validate=True)
    except (binascii.Error, ValueError):
        raise ConvexValueError(f"{name} holds malformed base64", path) from None
