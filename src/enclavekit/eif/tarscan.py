"""A strict, fast reader of tar headers (ustar, GNU long names, PAX), for image layers.

Why not :mod:`tarfile`: an image of 100,000 small files spent half of ``build-enclave`` in tarfile's header
parsing (``TarFile.next``, ``frombuf``, ``nti``/``nts``, checksums) plus three ``seek`` and three ``read`` calls
per file. This reader reads the layer sequentially through a 1 MiB window (file data that falls inside the
window costs nothing; large files are skipped with one seek), verifies each checksum with two C calls
(``zlib.adler32`` over each 256-byte half: neither half's byte sum can reach Adler's modulus, so the sum is
exact) and parses the numeric fields with one translate check and ``int``.

It reads what :mod:`tarfile` reads, with the same result, or refuses (:class:`MalformedInput`) where
tarfile is lenient (``tests/unit/build_enclave/test_tarscan.py`` compares both on generated archives):

- every header's checksum is verified (unsigned, or signed as old Sun tars wrote it, as tarfile accepts);
  numbers are octal (NUL/space terminated, optionally blank = 0) or base-256 (as tarfile); anything else —
  signs, underscores, ``0o`` prefixes, which ``int`` would take — is refused;
- ustar ``prefix`` fields are joined as tarfile joins them; a non-empty prefix area in a header without
  the POSIX ``ustar\\0`` magic (GNU headers keep atime/ctime there) is refused instead of being glued on;
- PAX records (``x``/``X``: ``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``) and GNU long
  names (``L``/``K``) apply to the next member; when several extension headers set one field, the first
  one in the file wins, as in tarfile. Records must be well formed (``LEN KEY=VALUE\\n`` tiling the
  header, numbers in decimal); tarfile skips bad records or reads bad numbers as 0;
- global PAX headers (``g``) that set any of those fields are refused (tarfile applies them to every
  later member, Docker's Go reader ignores them: no answer is safe); other global records are ignored;
- sparse members (``S``, ``GNU.sparse.*`` records) and unknown types are refused; negative sizes, data
  running past the end of the layer, an extension header without a member after it, and extension data
  over :data:`MAX_HEADER_READ` bytes are refused;
- the archive ends at the first zero block or at the end of the layer; any non-zero byte after that point
  (a damaged header, a partial block) is refused — tarfile would stop there silently. An empty (0-byte)
  layer is refused, as tarfile refuses it.

Not read: ``uname``/``gname``, ``atime``/``ctime``, extended attributes (a build drops them).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from enclavekit.errors import MalformedInput

BLOCK = 512
#: Bytes read from the layer at once (headers and the small files between them come in one read).
WINDOW = 1 << 20
#: Largest extension header (PAX records, GNU long name): such data is held in memory whole.
MAX_HEADER_READ = 16 << 20

#: Member types whose data follows the header (tarfile's REGULAR_TYPES, sparse refused).
REGULAR_TYPES = frozenset({b"0", b"\0", b"7"})
#: Member types without data (a size in their header is not followed by data, as in tarfile and Go).
HEADER_ONLY_TYPES = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})
_PAX_LOCAL = frozenset({b"x", b"X"})
_PAX_FIELDS = frozenset({b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime"})

_ZERO_BLOCK = bytes(BLOCK)
_NUL_TO_SPACE = bytes.maketrans(b"\0", b" ")
_OCTAL_SPACE = b"01234567 "
_NUMBERS = struct.Struct("8s8s8s12s12s8s")
_ZERO_DEVICES = frozenset({bytes(16), b"0000000\x000000000\x00", b"0000000 0000000 "})
_USTAR = b"ustar\x00"
_DIGITS_TO_ZERO = bytes.maketrans(b"1234567", b"0000000")
_COMMON_LAYOUT = b"0000000\x00" * 3 + b"00000000000\x00" * 2 + b"000000\x00 "
_PLAIN_TYPES = REGULAR_TYPES | HEADER_ONLY_TYPES
_LINK_TYPES = frozenset({b"1", b"2"})


class TarMember(NamedTuple):
    """One member. ``position`` is the offset of its first header (an extension header, if any) and
    ``data`` the offset of its data, both relative to the start of the layer; ``type`` is the tar type
    byte; names are raw bytes as stored (directories without trailing ``/``)."""

    position: int
    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    linkname: bytes
    devmajor: int
    devminor: int
    data: int
    size: int


_member = tuple.__new__


class FileWindow:
    """Reads an open file through a :data:`WINDOW`-byte window: reads that fall inside the window cost a
    slice, reads in file order cost one ``read`` per window."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._buf = b""
        self._base = 0  # file offset of self._buf[0]

    def read(self, position: int, n: int, *, limit: int) -> bytes:
        """``n`` bytes at ``position`` of the file, never reading at or past ``limit`` (fewer at the end)."""
        start = position - self._base
        if start >= 0 and start + n <= len(self._buf):
            return self._buf[start : start + n]
        self._handle.seek(position)
        if n > WINDOW:
            return self._handle.read(max(0, min(n, limit - position)))
        self._buf = self._handle.read(max(0, min(WINDOW, limit - position)))
        self._base = position
        return self._buf[:n]


class TarScanner:
    """Reads the members of the tar stored as ``size`` bytes at ``offset`` of the file behind ``window``.

    :meth:`members` walks the archive once, front to back; :meth:`member_at` re-reads one member by its
    ``position`` (cheap when it lies in the current window, as it does when members are re-read in the
    order they were stored). ``label`` names the layer in error messages.
    """

    def __init__(self, window: FileWindow, offset: int, size: int, *, label: str) -> None:
        self._window = window
        self._offset = offset
        self._size = size
        self._label = label

    def _fail(self, message: str) -> MalformedInput:
        return MalformedInput(f"{self._label}: {message}")

    def read(self, position: int, n: int) -> bytes:
        """``n`` bytes at ``position`` of the layer (fewer at its end)."""
        offset = self._offset
        return self._window.read(offset + position, n, limit=offset + self._size)

    # -- members -------------------------------------------------------------------------------------------
    def members(self) -> Iterator[TarMember]:
        """Every member in archive order; then the end of the archive is checked (see the module)."""
        if self._size == 0:
            raise self._fail("not a readable tar archive (empty file); the layer is corrupt")
        position = 0
        size = self._size
        read = self._window.read
        base, limit = self._offset, self._offset + size
        read_member = self._read_member
        adler32 = zlib.adler32
        while True:
            header = read(base + position, BLOCK, limit=limit) if size - position >= BLOCK else b""
            if not header or header == _ZERO_BLOCK:
                self._check_tail(position)
                return
            # The usual member, inline (one call per member costs more than its parsing): one plain
            # header, no prefix, Go's or Python's number layout, unsigned checksum, no device numbers.
            # Anything else, and every error, takes _read_member's general path (same result).
            kind = header[156:157]
            fields = header[100:156]
            if (
                kind in _PLAIN_TYPES
                and header[345] == 0
                and fields.translate(_DIGITS_TO_ZERO) == _COMMON_LAYOUT
                and header[329:345] in _ZERO_DEVICES
                and len(header) == BLOCK
            ):
                v = int(fields.translate(None, b"\0 "), 8)
                if (v & 0o777777) == (
                    (adler32(header[:148]) & 0xFFFF)
                    + (adler32(header[156:412]) & 0xFFFF)
                    + (adler32(header[412:]) & 0xFFFF)
                    + 253
                ):
                    cut = header.find(b"\0", 0, 100)
                    name = header[:cut] if cut >= 0 else header[:100]
                    v >>= 18
                    mtime = v & 0o77777777777
                    v >>= 33
                    length = v & 0o77777777777
                    v >>= 33
                    data = position + BLOCK
                    if kind in REGULAR_TYPES:
                        if kind != b"\0" or not name.endswith(b"/"):
                            following = data + length + (-length % BLOCK)
                            if following > size:
                                raise self._past_end(name, length)
                            yield _member(
                                TarMember,
                                (position, name, kind, v >> 42, (v >> 21) & 0o7777777,
                                 v & 0o7777777, mtime, b"", 0, 0, data, length),
                            )  # fmt: skip
                            position = following
                            continue
                    elif kind == b"5":
                        yield _member(
                            TarMember,
                            (position, name.rstrip(b"/"), kind, v >> 42, (v >> 21) & 0o7777777,
                             v & 0o7777777, mtime, b"", 0, 0, data, length),
                        )  # fmt: skip
                        position = data
                        continue
            member, position = read_member(position, header)
            yield member

    def member_at(self, position: int) -> TarMember:
        """The member whose first header is at ``position`` (as :meth:`members` gave it)."""
        base = self._offset
        header = self._window.read(base + position, BLOCK, limit=base + self._size)
        return self._read_member(position, header)[0]

    def _check_tail(self, position: int) -> None:
        while position < self._size:
            chunk = self.read(position, WINDOW)
            if not chunk:
                break
            if chunk.strip(b"\0"):
                raise self._fail(
                    f"the tar listing stops at a damaged header (offset {position}) but data follows; "
                    "the layer is corrupt"
                )
            position += len(chunk)

    def _read_member(self, start: int, header: bytes) -> tuple[TarMember, int]:
        kind = header[156:157]
        if kind in _PLAIN_TYPES and header[345] == 0 and len(header) == BLOCK:
            # The usual member: one header, no prefix (the general path below gives the same result).
            mode, uid, gid, size, mtime = self._numbers(header, start)
            cut = header.find(b"\0", 0, 100)
            name = header[:cut] if cut >= 0 else header[:100]
            if kind == b"\0" and name.endswith(b"/"):
                kind = b"5"
            if kind == b"5":
                name = name.rstrip(b"/")
                linkname = b""
            elif kind in _LINK_TYPES:
                cut = header.find(b"\0", 157, 257)
                linkname = header[157:cut] if cut >= 0 else header[157:257]
            else:
                linkname = b""
            devices = header[329:345]
            if devices in _ZERO_DEVICES:
                major = minor = 0
            else:
                major = self._number(devices[:8], start)
                minor = self._number(devices[8:], start)
            data = start + BLOCK
            if kind in REGULAR_TYPES:
                following = data + size + (-size % BLOCK)
                if size < 0 or following > self._size:
                    raise self._past_end(name, size)
            else:
                following = data
            member = _member(
                TarMember,
                (start, name, kind, mode, uid, gid, mtime, linkname, major, minor, data, size),
            )
            return member, following
        return self._read_extended(start, header)

    def _past_end(self, name: bytes, size: int) -> MalformedInput:
        if size < 0:
            return self._fail(f"entry {_show(name)} has a negative size")
        return self._fail(
            f"entry {_show(name)} runs past the end of the layer (its data and padding to "
            f"{BLOCK} bytes must lie inside)"
        )

    def _read_extended(self, start: int, header: bytes) -> tuple[TarMember, int]:
        position = start
        name: bytes | None = None
        linkname: bytes | None = None
        size: int | None = None
        uid: int | None = None
        gid: int | None = None
        mtime: int | None = None
        extended = False
        while True:
            if position != start:
                header = self.read(position, BLOCK)
            if len(header) < BLOCK or header == _ZERO_BLOCK:
                if extended:
                    raise self._fail(
                        f"an extension header at offset {start} is not followed by a member; "
                        "the layer is corrupt or truncated"
                    )
                raise self._fail(f"truncated tar header at offset {position}")
            h_mode, h_uid, h_gid, h_size, h_mtime = self._numbers(header, position)
            kind = header[156:157]
            if h_size < 0:
                raise self._fail(f"negative size in the tar header at offset {position}")
            data = position + BLOCK
            if kind in _PLAIN_TYPES:
                break
            # An extension header: its data applies to the next member.
            if kind == b"S":
                raise self._fail(
                    f"sparse tar member at offset {position}: not supported (image layers never "
                    "hold sparse files; re-export the image)"
                )
            if kind not in _PAX_LOCAL and kind not in (b"g", b"L", b"K"):
                name_field = header[:100].split(b"\0", 1)[0]
                raise self._fail(f"entry {_show(name_field)} has unsupported tar type {kind!r}")
            if h_size > MAX_HEADER_READ:
                raise self._fail(
                    f"a tar header of {h_size} bytes at offset {position}; refusing more than "
                    f"{MAX_HEADER_READ} (PAX records and long names are small)"
                )
            blob = self.read(data, h_size)
            if len(blob) < h_size:
                raise self._fail(f"the extension header at offset {position} is truncated")
            extended = True
            if kind == b"L":
                if name is None:
                    name = blob.split(b"\0", 1)[0]
            elif kind == b"K":
                if linkname is None:
                    linkname = blob.split(b"\0", 1)[0]
            else:
                records = self._pax(blob, position)
                if kind == b"g":
                    bad = sorted(
                        k for k in records if k in _PAX_FIELDS or k.startswith(b"GNU.sparse.")
                    )
                    if bad:
                        raise self._fail(
                            f"a global PAX header at offset {position} sets "
                            f"{b', '.join(bad).decode('ascii', 'backslashreplace')} for every later "
                            "member; refusing (tar readers disagree on it)"
                        )
                else:
                    for key, value in records.items():
                        if key.startswith(b"GNU.sparse."):
                            raise self._fail(
                                f"sparse tar member at offset {position}: not supported"
                            )
                        if key == b"path" and name is None:
                            name = value.rstrip(b"/")
                        elif key == b"linkpath" and linkname is None:
                            linkname = value
                        elif key == b"size" and size is None:
                            size = self._pax_int(key, value, position)
                        elif key == b"uid" and uid is None:
                            uid = self._pax_int(key, value, position)
                        elif key == b"gid" and gid is None:
                            gid = self._pax_int(key, value, position)
                        elif key == b"mtime" and mtime is None:
                            mtime = self._pax_time(value, position)
            position = data + (-h_size % BLOCK) + h_size
        # The member's own header.
        cut = header.find(b"\0", 0, 100)
        own = header[:cut] if cut >= 0 else header[:100]
        if kind == b"\0" and own.endswith(b"/"):
            kind = b"5"  # an old V7 directory
        if name is None:
            name = own
            if header[345]:
                prefix = header[345:500].split(b"\0", 1)[0]
                if header[257:263] != _USTAR:
                    raise self._fail(
                        f"entry {_show(name)} at offset {position}: a non-POSIX header with data in "
                        "the ustar prefix field (GNU atime/ctime?); not supported"
                    )
                name = prefix + b"/" + name
        if kind == b"5":
            name = name.rstrip(b"/")
        if linkname is None:
            linkname = header[157:257].split(b"\0", 1)[0] if kind in _LINK_TYPES else b""
        devices = header[329:345]
        if devices in _ZERO_DEVICES:
            major = minor = 0
        else:
            major = self._number(devices[:8], position)
            minor = self._number(devices[8:], position)
        if size is None:
            size = h_size
        elif size < 0:
            raise self._fail(f"negative size in the PAX header at offset {start}")
        if kind in REGULAR_TYPES:
            following = data + size + (-size % BLOCK)
            if following > self._size:
                raise self._past_end(name, size)
        else:
            following = data
        member = _member(
            TarMember,
            (
                start,
                name,
                kind,
                h_mode,
                h_uid if uid is None else uid,
                h_gid if gid is None else gid,
                h_mtime if mtime is None else mtime,
                linkname,
                major,
                minor,
                data,
                size,
            ),
        )
        return member, following

    # -- fields --------------------------------------------------------------------------------------------
    def _numbers(self, header: bytes, position: int) -> tuple[int, int, int, int, int]:
        """Mode, uid, gid, size, mtime of a header whose checksum is verified."""
        # The byte sum without the checksum field (counted as 8 spaces): three pieces, none of whose
        # sums reaches Adler-32's modulus, so each A value is exactly 1 + the piece's sum.
        checksum = (
            (zlib.adler32(header[:148]) & 0xFFFF)
            + (zlib.adler32(header[156:412]) & 0xFFFF)
            + (zlib.adler32(header[412:]) & 0xFFFF)
            + 253
        )
        fields = header[100:156]
        values: tuple[int, ...] | None = None
        if fields.translate(_DIGITS_TO_ZERO) == _COMMON_LAYOUT:
            # Go's and Python's writers: 7, 7, 7, 11, 11 and 6 octal digits at fixed places; one int.
            v = int(fields.translate(None, b"\0 "), 8)
            stored = v & 0o777777
            v >>= 18
            mtime = v & 0o77777777777
            v >>= 33
            size = v & 0o77777777777
            v >>= 33
            if stored == checksum:
                return v >> 42, (v >> 21) & 0o7777777, v & 0o7777777, size, mtime
            values = (v >> 42, (v >> 21) & 0o7777777, v & 0o7777777, size, mtime, stored)
        elif not (fields := fields.translate(_NUL_TO_SPACE)).translate(None, _OCTAL_SPACE):
            m, u, g, s, t, c = _NUMBERS.unpack(fields)
            try:
                values = (int(m, 8), int(u, 8), int(g, 8), int(s, 8), int(t, 8), int(c, 8))
            except ValueError:
                values = None
        if values is None:
            raw = _NUMBERS.unpack(header[100:156])
            values = tuple(self._number(field, position) for field in raw)
        stored = values[5]
        if stored != checksum:
            signed = checksum - 256 * sum(1 for b in header[:148] + header[156:] if b >= 0x80)
            if stored != signed:
                raise self._fail(
                    f"not a readable tar archive (bad checksum in the header at offset {position}); "
                    "the layer is corrupt or truncated"
                )
        return values[0], values[1], values[2], values[3], values[4]

    def _number(self, field: bytes, position: int) -> int:
        """A numeric header field as tarfile's ``nti`` reads it, but only octal digits after trimming."""
        if field[0] in (0o200, 0o377):
            value = int.from_bytes(field[1:], "big")
            return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
        text = field.split(b"\0", 1)[0].strip(b" \t\n\r\x0b\x0c")
        if text.translate(None, b"01234567"):
            raise self._fail(
                f"not a readable tar archive (invalid number {field!r} in the header at offset "
                f"{position}); the layer is corrupt"
            )
        return int(text, 8) if text else 0

    def _pax(self, blob: bytes, position: int) -> dict[bytes, bytes]:
        """``LEN KEY=VALUE\\n`` records tiling ``blob`` (trailing NULs allowed)."""
        records: dict[bytes, bytes] = {}
        pos, end = 0, len(blob.rstrip(b"\0"))
        while pos < end:
            space = blob.find(b" ", pos, pos + 21)
            digits = blob[pos:space] if space > pos else b""
            if not digits.isdigit():
                raise self._bad_pax(position)
            stop = pos + int(digits)
            equals = blob.find(b"=", space + 1, stop)
            if stop > len(blob) or equals <= space + 1 or blob[stop - 1 : stop] != b"\n":
                raise self._bad_pax(position)
            records[blob[space + 1 : equals]] = blob[equals + 1 : stop - 1]
            pos = stop
        return records

    def _bad_pax(self, position: int) -> MalformedInput:
        return self._fail(
            f"malformed PAX records in the header at offset {position}; the layer is corrupt"
        )

    def _pax_int(self, key: bytes, value: bytes, position: int) -> int:
        if not value.isdigit():
            raise self._fail(
                f"PAX {key.decode()} {value[:40]!r} in the header at offset {position} is not a "
                "decimal number"
            )
        return int(value)

    def _pax_time(self, value: bytes, position: int) -> int:
        negative = value.startswith(b"-")
        whole, dot, fraction = value[negative:].partition(b".")
        if not whole.isdigit() or (dot and fraction and not fraction.isdigit()):
            raise self._fail(
                f"PAX mtime {value[:40]!r} in the header at offset {position} is not a number"
            )
        seconds = int(whole)
        if negative:
            return -seconds - (1 if fraction.strip(b"0") else 0)
        return seconds


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))
