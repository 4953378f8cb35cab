"""A strict CBOR decoder for untrusted input.

General-purpose decoders are too lenient for attestation data: they silently keep the last of duplicate map
keys, some accept trailing bytes, and all of them let Python's ``True == 1 == 1.0`` merge keys of different
types. This decoder accepts the RFC 8949 data model that attestation documents and NSM messages use, with
definite **and** indefinite containers, and rejects:

- trailing bytes after the top-level item,
- duplicate map keys, compared by CBOR type *and* value (``1``, ``1.0`` and ``true`` are three keys),
- nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ITEMS` items, or lengths past the input,
- reserved additional-info values (28-30), break codes outside indefinite containers, and simple values
  0..31 in the two-byte form (not well-formed, RFC 8949 §3.3).

Non-minimal-length *headers* are accepted (AWS never emits them; RFC 8949 allows them).

Maps decode to ``dict`` (insertion order kept), arrays to ``list``, tags to :class:`Tagged`, ``false``/
``true``/``null`` to ``False``/``True``/``None``, every other simple value (``undefined`` = 23 included) to
:class:`Simple`. Floats decode to ``float``. Map keys that Python would confuse with integers (booleans and
floats) are wrapped in :class:`TypedKey`, so ``{true: -35}`` never equals ``{1: -35}``; integer, text and
byte-string keys stay plain. What is *not* checked: canonical ordering of keys.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from enclavekit.errors import MalformedInput

#: Attestation documents nest 3 levels; NSM messages 4. 16 is generous and bounds recursion.
MAX_DEPTH = 16
#: Bounds the work an adversarial input can cause (a real document has < 100 items).
MAX_ITEMS = 100_000


@dataclass(frozen=True, slots=True, eq=False)
class Tagged:
    """A CBOR tag and its content. Equality is CBOR equality: tag and content compared by type and value."""

    tag: int
    value: Any

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tagged):
            return NotImplemented
        return self.tag == other.tag and identity(self.value) == identity(other.value)

    def __hash__(self) -> int:
        return hash((self.tag, identity(self.value)))


@dataclass(frozen=True, slots=True)
class Simple:
    """A simple value other than false/true/null (``undefined`` is ``Simple(23)``)."""

    value: int


UNDEFINED = Simple(23)


@dataclass(frozen=True, slots=True, eq=False)
class TypedKey:
    """A map key that Python would otherwise equate with an integer: a boolean or a float."""

    value: bool | float

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TypedKey):
            return NotImplemented
        return identity(self.value) == identity(other.value)

    def __hash__(self) -> int:
        return hash(identity(self.value))

    def __repr__(self) -> str:
        return f"TypedKey({self.value!r})"


def identity(value: Any) -> tuple[Any, ...]:
    """A hashable value that differs whenever the CBOR type or value differs (``1``, ``1.0``, ``True``
    and ``-0.0`` vs ``0.0`` are all distinct)."""
    kind = type(value)
    if kind is float:
        return (kind, struct.pack(">d", value))
    if kind is list:
        return (kind, tuple(identity(item) for item in value))
    if kind is dict:
        return (kind, frozenset((identity(k), identity(v)) for k, v in value.items()))
    if kind is Tagged:
        return (kind, value.tag, identity(value.value))
    if kind is TypedKey:
        return identity(value.value)
    return (kind, value)


_BREAK = object()  # the indefinite-length break stop code
_SIMPLE = {20: False, 21: True, 22: None}


def _decode(data: bytes) -> tuple[Any, int]:
    n = len(data)
    budget = [MAX_ITEMS]  # items left; bounds the work an adversarial input can cause

    def fail(pos: int, what: str) -> MalformedInput:
        return MalformedInput(f"invalid CBOR at byte {pos}: {what}")

    def item(pos: int, depth: int) -> tuple[Any, int]:
        # Fast paths for the common scalars of attestation data: small uints, short byte/text strings.
        if pos < n:
            initial = data[pos]
            if initial < 0x18:
                budget[0] -= 1
                return initial, pos + 1
            if 0x40 <= initial < 0x58 or initial == 0x58 or initial == 0x59:
                if initial < 0x58:
                    start, length = pos + 1, initial - 0x40
                elif initial == 0x58 and pos + 1 < n:
                    start, length = pos + 2, data[pos + 1]
                elif initial == 0x59 and pos + 2 < n:
                    start, length = pos + 3, (data[pos + 1] << 8) | data[pos + 2]
                else:
                    start, length = -1, 0
                end = start + length
                if start >= 0 and end <= n:
                    budget[0] -= 1
                    return data[start:end], end
        if pos >= n:
            raise fail(pos, "need 1 byte(s), only 0 left (truncated input)")
        budget[0] -= 1
        if budget[0] < 0:
            raise fail(pos, f"more than {MAX_ITEMS} items")
        initial = data[pos]
        major = initial >> 5
        info = initial & 0x1F
        pos += 1
        if info < 24:
            arg: int | None = info
        elif info < 28:
            size = 1 << (info - 24)
            end = pos + size
            if end > n:
                raise fail(pos, f"need {size} byte(s), only {n - pos} left (truncated input)")
            arg = int.from_bytes(data[pos:end], "big")
            pos = end
        elif info == 31:
            arg = None
        else:
            raise fail(pos - 1, f"reserved additional information {info}")
        if major == 2 or major == 3:
            if arg is None:
                return chunked(pos, major)
            end = pos + arg
            if end > n:
                raise fail(pos, f"need {arg} byte(s), only {n - pos} left (truncated input)")
            raw = data[pos:end]
            if major == 2:
                return raw, end
            try:
                return raw.decode("utf-8"), end
            except UnicodeDecodeError:
                raise fail(pos, "text string is not valid UTF-8") from None
        if major == 0:
            if arg is None:
                raise fail(pos - 1, "indefinite length on an integer")
            return arg, pos
        if major == 1:
            if arg is None:
                raise fail(pos - 1, "indefinite length on an integer")
            return -1 - arg, pos
        if depth >= MAX_DEPTH and major in (4, 5, 6):
            raise fail(pos - 1, f"nesting deeper than {MAX_DEPTH}")
        if major == 5:
            result: dict[Any, Any] = {}
            if arg is None:
                while True:
                    key_pos = pos
                    key, pos = item(pos, depth + 1)
                    if key is _BREAK:
                        return result, pos
                    value, pos = item(pos, depth + 1)
                    if value is _BREAK:
                        raise fail(pos - 1, "unexpected break code")
                    add(result, key, value, key_pos)
            if arg * 2 > n - pos:
                raise fail(pos, f"container claims {arg} entries, input has {n - pos} bytes")
            for _ in range(arg):
                key_pos = pos
                key, pos = item(pos, depth + 1)
                value, pos = item(pos, depth + 1)
                if key is _BREAK or value is _BREAK:
                    raise fail(pos - 1, "unexpected break code")
                add(result, key, value, key_pos)
            return result, pos
        if major == 4:
            out: list[Any] = []
            if arg is None:
                while True:
                    value, pos = item(pos, depth + 1)
                    if value is _BREAK:
                        return out, pos
                    out.append(value)
            if arg > n - pos:
                raise fail(pos, f"container claims {arg} items, input has {n - pos} bytes")
            for _ in range(arg):
                value, pos = item(pos, depth + 1)
                if value is _BREAK:
                    raise fail(pos - 1, "unexpected break code")
                out.append(value)
            return out, pos
        if major == 6:
            if arg is None:
                raise fail(pos - 1, "indefinite-length tag")
            value, pos = item(pos, depth + 1)
            if value is _BREAK:
                raise fail(pos - 1, "unexpected break code")
            return Tagged(arg, value), pos
        # major 7
        if info == 31:
            return _BREAK, pos
        if info < 24:
            return (_SIMPLE[info] if info in _SIMPLE else Simple(info)), pos
        assert arg is not None
        if info == 24:
            if arg < 32:
                raise fail(pos - 2, f"simple value {arg} in the two-byte form (not well-formed)")
            return Simple(arg), pos
        if info == 25:
            return struct.unpack(">e", arg.to_bytes(2, "big"))[0], pos
        if info == 26:
            return struct.unpack(">f", arg.to_bytes(4, "big"))[0], pos
        if info == 27:
            return struct.unpack(">d", arg.to_bytes(8, "big"))[0], pos
        raise fail(pos - 2, "unsupported simple value")  # pragma: no cover - info 24..27 handled

    def add(result: dict[Any, Any], key: Any, value: Any, key_pos: int) -> None:
        kind = type(key)
        if kind is bool or kind is float:
            key = TypedKey(key)  # keep true, 1.0 and 1 apart
        try:
            if key in result:
                raise fail(key_pos, f"duplicate map key {key!r}")
        except TypeError:  # an array or a map, possibly inside a tag
            raise fail(key_pos, "map key of an unhashable type (array or map)") from None
        result[key] = value

    def chunked(pos: int, major: int) -> tuple[Any, int]:
        chunks: list[Any] = []
        while True:
            if pos >= n:
                raise fail(pos, "truncated indefinite-length string")
            initial = data[pos]
            if initial == 0xFF:
                pos += 1
                break
            if initial >> 5 != major or (initial & 0x1F) == 31:
                raise fail(pos, "bad chunk in an indefinite-length string")
            chunk, pos = item(pos, MAX_DEPTH)
            chunks.append(chunk)
        if major == 2:
            return b"".join(chunks), pos
        return "".join(chunks), pos

    value, pos = item(0, 0)
    return value, pos


def loads(data: bytes, *, what: str = "CBOR data") -> Any:
    """Decode exactly one CBOR item that spans all of ``data``; raise :class:`MalformedInput` otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    try:
        value, end = _decode(raw)
    except MalformedInput as exc:
        raise MalformedInput(f"{what}: {exc}") from None
    except RecursionError:
        raise MalformedInput(f"{what}: nested too deeply") from None
    if value is _BREAK:
        raise MalformedInput(f"{what}: starts with a break code")
    if end != len(raw):
        raise MalformedInput(
            f"{what}: {len(raw) - end} trailing byte(s) after the CBOR item "
            f"(expected the item to end the input at byte {end})"
        )
    return value
