"""The user's files and encoded values, as commands read and write them.

Every error names the flag (or argument) and the user's path — never an internal temporary name, never a
bare errno string — and says what was expected. Text given as hex or base64 that fails to decode says
which encoding was detected and where it broke (byte offset, line and column).
"""

from __future__ import annotations

import base64
import binascii
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from enclavekit.errors import MalformedInput, UsageError

if TYPE_CHECKING:
    from enclavekit.attestation.policy import Policy

F = TypeVar("F", bound=Callable[..., Any])

#: A policy file larger than this is not a policy (real ones are a few KiB).
MAX_POLICY_FILE = 1024 * 1024

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")
_SPACE = frozenset(b" \t\r\n")
#: Share of a text's characters that must belong to an alphabet for it to count as that encoding.
_DETECTION_SHARE = 0.9


def _reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def read_input(path: str | Path, option: str, *, limit: int) -> bytes:
    """The bytes of ``path`` (``-``: stdin), at most ``limit`` of them; a stop signal ends a wait for them."""
    from enclavekit.cli import _waiting

    try:
        if str(path) != "-":
            data = _waiting.read_path(path, limit)
        elif (fd := _stdin_fd()) is not None:
            data = _waiting.read_fd(fd, limit)
        else:  # stdin replaced by an in-memory stream (an embedding program, click's test runner)
            data = sys.stdin.buffer.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it: {_reason(exc)}") from None
    if len(data) > limit:
        raise MalformedInput(f"{option} {path}: larger than {limit} bytes")
    return data


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.buffer.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def write_output(path: str | Path, data: bytes, option: str, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (``-``: stdout); errors name ``path``, not the temp file."""
    from enclavekit._fs import write_atomic

    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        write_atomic(path, data, mode=mode)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write it: {_reason(exc)}") from None


def _temp_target(name: str | None) -> Path | None:
    """The file a temporary ``.NAME.<random>.tmp`` (or ``.NAME.<random>`` directory) stands for."""
    if not name:
        return None
    path = Path(name)
    parts = path.name.split(".")
    # ".x.eif.ab12cd34.tmp" -> ["", "x", "eif", "ab12cd34", "tmp"]
    if len(parts) >= 4 and parts[0] == "" and parts[-1] == "tmp":
        return path.with_name(".".join(parts[1:-2]))
    return None


def output_error(exc: OSError, outputs: dict[str, Path | None]) -> UsageError | None:
    """A UsageError naming the flag and the user's path when ``exc`` is about one of ``outputs``
    (flag -> path) or a temporary file beside it; None when it is about another file."""
    if exc.filename is None:
        return None
    filename = Path(exc.filename)
    meant = _temp_target(exc.filename) or filename
    for option, path in outputs.items():
        if path is None:
            continue
        scratch = any(  # inside a scratch directory made beside the output (.NAME.<random>/...)
            parent.parent == path.parent and parent.name.startswith(f".{path.name}.")
            for parent in filename.parents
        )
        if meant == path or filename == path or scratch:
            return UsageError(f"{option} {path}: cannot write it: {_reason(exc)}")
    return None


def describe_os_error(exc: OSError) -> str:
    """An OSError for the user: the reason and the file it is about, never a temporary name."""
    if exc.filename is None:
        return _reason(exc)
    shown = _temp_target(exc.filename) or exc.filename
    return f"{shown}: {_reason(exc)}"


def require_text(data: bytes, path: str | Path, option: str, expected: str) -> str:
    """``data`` as UTF-8 text, or a UsageError naming the file and the first byte that is not text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{option} {path}: not a text file (byte {exc.start} is 0x{data[exc.start]:02x}, not"
            f" UTF-8); expected {expected}"
        ) from None


def read_policy(path: str, option: str = "--policy") -> Policy:
    """A verification policy file (JSON/YAML or nitro-cli measurements), errors naming ``option``."""
    from enclavekit.attestation.policy import load_policy

    data = read_input(path, option, limit=MAX_POLICY_FILE)
    require_text(data, path, option, "a JSON or YAML policy, or nitro-cli build-enclave JSON")
    try:
        return load_policy(path)
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _where(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"byte {offset} (line {line}, column {column})"


def _show(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"0x{byte:02x}"


def text_encoding_error(data: bytes) -> str | None:
    """Why ``data``, text that looks like hex or base64, does not decode; None when it decodes (as
    :func:`~enclavekit.attestation.document.read_document_bytes` would: hex first, then base64) or is
    not such text (raw binary is left to the caller's decoder).

    The encoding is detected by alphabet: at least 90 % hex digits is hex, else at least 90 % base64
    characters is base64. A long text of hex digits with a stray character that happens to be valid
    base64 (one ``z`` in 10,000 digits) is still reported as broken hex, not decoded as base64.
    """
    chars = [(i, b) for i, b in enumerate(data) if b not in _SPACE]
    if not chars or data.lstrip()[:1] in (b"\x84", b"\xd2"):
        return None
    compact = bytes(b for _, b in chars)
    not_hex = [(i, b) for i, b in chars if b not in _HEX_DIGITS]
    if not not_hex and len(compact) % 2 == 0:
        return None  # hex
    hex_share = 1 - len(not_hex) / len(chars)
    base64_problem = _base64_problem(data, chars)
    if base64_problem is None:  # valid base64, unless it is plainly hex with a stray character
        stray = len(not_hex) <= max(1, len(chars) // 100) and len(chars) >= 64
        if not (hex_share >= _DETECTION_SHARE and stray and not compact.endswith(b"=")):
            return None
    if hex_share >= _DETECTION_SHARE:
        if not_hex:
            i, b = not_hex[0]
            return f"detected hex text; {_where(data, i)} is {_show(b)}, not a hex digit"
        return f"detected hex text; it has an odd number of digits ({len(chars)})"
    base64_share = sum(b in _BASE64_CHARS for b in compact) / len(chars)
    if base64_share >= _DETECTION_SHARE:
        return f"detected base64 text; {base64_problem}"
    return None


def _base64_problem(data: bytes, chars: list[tuple[int, int]]) -> str | None:
    """Why the non-space characters ``chars`` of ``data`` are not base64 (standard or URL-safe)."""
    for i, b in chars:
        if b not in _BASE64_CHARS:
            return f"{_where(data, i)} is {_show(b)}, not a base64 character"
    compact = bytes(b for _, b in chars)
    body = compact.rstrip(b"=")
    if b"=" in body:
        return f"{_where(data, chars[body.index(b'=')][0])} is '=' (padding) before the end"
    if len(body) % 4 == 1:
        return (
            f"{len(body)} characters (without padding) cannot be base64: the text is cut short or"
            " has one character too many"
        )
    try:
        padded = body + b"=" * (-len(body) % 4)
        if b"-" in body or b"_" in body:
            base64.urlsafe_b64decode(padded)
        else:
            base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"it does not decode: {exc}"
    return None


def decode_document(data: bytes, source: str) -> bytes:
    """Raw COSE bytes of an attestation document given as raw CBOR, hex or base64 text."""
    from enclavekit.attestation.document import read_document_bytes

    problem = text_encoding_error(data)
    if problem is not None:
        raise MalformedInput(f"{source}: {problem}")
    return read_document_bytes(data)


def parse_hex(value: str, option: str) -> bytes:
    """A hex option value (``0x`` prefix and surrounding spaces allowed)."""
    text = value.strip().removeprefix("0x").removeprefix("0X")
    for i, char in enumerate(text):
        if char not in "0123456789abcdefABCDEF":
            raise UsageError(
                f"{option}: expected hexadecimal digits; character {i + 1} of {value!r} is {char!r}"
            )
    if len(text) % 2:
        raise UsageError(
            f"{option}: expected an even number of hexadecimal digits, found {len(text)}"
        )
    return bytes.fromhex(text)


def renamed_option(
    new: tuple[str, ...], dest: str, old: str, *, required: bool = False, **kwargs: Any
) -> Callable[[F], F]:
    """A click option under its common name (``new``), still accepting its previous name ``old``
    (hidden from --help). The command receives the value as ``dest`` either way."""
    alias_dest = f"_{dest}_old_name"

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **values: Any) -> Any:
            alias = values.pop(alias_dest, None)
            if alias is not None:
                if values.get(dest) is not None:
                    raise click.UsageError(f"{old} is the old name of {new[-1]}: give one of them")
                values[dest] = alias
            if required and values.get(dest) is None:
                raise click.UsageError(f"Missing option {' / '.join(repr(n) for n in new)}.")
            return func(*args, **values)

        with_alias = click.option(old, alias_dest, hidden=True, **kwargs)(wrapper)
        return click.option(*new, dest, **kwargs)(with_alias)  # type: ignore[return-value]

    return decorate
