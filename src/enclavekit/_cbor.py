"""A strict CBOR decoder for untrusted input.

General-purpose decoders are too lenient for attestation data: they silently keep the last of duplicate map
keys, and some accept trailing bytes. This decoder accepts the RFC 8949 data model that attestation documents
and NSM messages use, with definite **and** indefinite containers, and rejects:

- trailing bytes after the top-level item,
- duplicate map keys (compared after decoding),
- nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ITEMS` items, or lengths past the input,
- non-minimal-length *headers* are accepted (AWS never emits them; RFC 8949 allows them),
- reserved additional-info values (28-30), break codes outside indefinite containers, undefined simple values.

Maps decode to ``dict`` (insertion order kept), arrays to ``list``, tags to :class:`Tagged`.
Floats decode to ``float``. What is *not* checked: canonical ordering of keys.
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


@dataclass(frozen=True, slots=True)
class Tagged:
    """A CBOR tag and its content."""

    tag: int
    value: Any


class _Break:
    """Sentinel for the indefinite-length ``break`` stop code."""


_BREAK = _Break()


class _Decoder:
    __slots__ = ("data", "items", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.items = 0

    def fail(self, what: str) -> MalformedInput:
        return MalformedInput(f"invalid CBOR at byte {self.pos}: {what}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self.fail(
                f"need {n} byte(s), only {len(self.data) - self.pos} left (truncated input)"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int, int | None]:
        """Return (major type, additional info, argument or None for indefinite)."""
        (initial,) = self.take(1)
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info == 24:
            return major, info, self.take(1)[0]
        if info == 25:
            return major, info, struct.unpack(">H", self.take(2))[0]
        if info == 26:
            return major, info, struct.unpack(">I", self.take(4))[0]
        if info == 27:
            return major, info, struct.unpack(">Q", self.take(8))[0]
        if info == 31:
            return major, info, None
        raise self.fail(f"reserved additional information {info}")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH}")
        self.items += 1
        if self.items > MAX_ITEMS:
            raise self.fail(f"more than {MAX_ITEMS} items")
        start = self.pos
        major, info, arg = self.head()
        if major == 0:
            return self._definite(arg, major)
        if major == 1:
            return -1 - self._definite(arg, major)
        if major in (2, 3):
            if arg is None:
                return self._chunked(major, depth)
            raw = self.take(arg)
            return raw if major == 2 else self._text(raw)
        if major == 4:
            if arg is None:
                out: list[Any] = []
                while (value := self.item(depth + 1)) is not _BREAK:
                    out.append(value)
                return out
            self._plausible(arg)
            return [self._value(depth + 1) for _ in range(arg)]
        if major == 5:
            result: dict[Any, Any] = {}
            count = None if arg is None else arg
            if count is not None:
                self._plausible(count * 2)
            n = 0
            while count is None or n < count:
                key_pos = self.pos
                key = self.item(depth + 1)
                if key is _BREAK:
                    if count is None:
                        break
                    raise self.fail("unexpected break in a definite-length map")
                value = self._value(depth + 1)
                try:
                    duplicate = key in result
                except TypeError:
                    self.pos = key_pos
                    raise self.fail("map key of an unhashable type (array or map)") from None
                if duplicate:
                    self.pos = key_pos
                    raise self.fail(f"duplicate map key {key!r}")
                result[key] = value
                n += 1
            return result
        if major == 6:
            if arg is None:
                raise self.fail("indefinite-length tag")
            return Tagged(arg, self._value(depth + 1))
        # major 7: simple values and floats
        if info == 31:
            return _BREAK
        if info < 24:
            simple = {20: False, 21: True, 22: None}
            if info in simple:
                return simple[info]
            self.pos = start
            raise self.fail(f"unsupported simple value {info}")
        if info == 25:
            return struct.unpack(">e", struct.pack(">H", arg))[0]
        if info == 26:
            return struct.unpack(">f", struct.pack(">I", arg))[0]
        if info == 27:
            return struct.unpack(">d", struct.pack(">Q", arg))[0]
        self.pos = start
        raise self.fail("unsupported simple value")

    def _value(self, depth: int) -> Any:
        value = self.item(depth)
        if value is _BREAK:
            raise self.fail("unexpected break code")
        return value

    def _definite(self, arg: int | None, major: int) -> int:
        if arg is None:
            raise self.fail(f"indefinite length on major type {major}")
        return arg

    def _plausible(self, count: int) -> None:
        # Each item needs at least one byte: refuse counts that cannot fit, before allocating.
        if count > len(self.data) - self.pos:
            raise self.fail(
                f"container claims {count} items, input has {len(self.data) - self.pos} bytes"
            )

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("text string is not valid UTF-8") from None

    def _chunked(self, major: int, depth: int) -> bytes | str:
        chunks: list[bytes] = []
        while True:
            sub_major, _info, arg = self.head()
            if sub_major == 7 and arg is None:
                break
            if sub_major != major or arg is None:
                raise self.fail("bad chunk in an indefinite-length string")
            chunks.append(self.take(arg))
        raw = b"".join(chunks)
        return raw if major == 2 else self._text(raw)


def loads(data: bytes, *, what: str = "CBOR data") -> Any:
    """Decode exactly one CBOR item that spans all of ``data``; raise :class:`MalformedInput` otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    decoder = _Decoder(bytes(data))
    try:
        value = decoder.item(0)
    except MalformedInput as exc:
        raise MalformedInput(f"{what}: {exc}") from None
    except RecursionError:
        raise MalformedInput(f"{what}: nested too deeply") from None
    if value is _BREAK:
        raise MalformedInput(f"{what}: starts with a break code")
    if decoder.pos != len(decoder.data):
        raise MalformedInput(
            f"{what}: {len(decoder.data) - decoder.pos} trailing byte(s) after the CBOR item "
            f"(expected the item to end the input at byte {decoder.pos})"
        )
    return value
