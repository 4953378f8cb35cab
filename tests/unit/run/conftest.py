"""Fixtures for the local runner: a tiny independent newc writer and EIFs built from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.writer import write_eif
from enclavekit.run.state import EnclaveStore

Entry = tuple[str, int, bytes]  # name, mode (type|perms), data


def newc(entries: Sequence[Entry], *, magic: bytes = b"070701", trailer: bool = True) -> bytes:
    """A newc archive (independent of enclavekit's writers, so reader bugs are not mirrored)."""
    out = bytearray()

    def pad() -> None:
        while len(out) % 4:
            out.append(0)

    items = list(entries) + ([("TRAILER!!!", 0, b"")] if trailer else [])
    for ino, (name, mode, data) in enumerate(items, start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 1700000000, len(data), 0, 0, 0, 0, len(raw), 0]
        out += magic + b"".join(b"%08x" % f for f in fields) + raw
        pad()
        out += data
        pad()
    while len(out) % 512:
        out.append(0)
    return bytes(out)


def d(name: str, perms: int = 0o755) -> Entry:
    return (name, 0o040000 | perms, b"")


def f(name: str, data: bytes, perms: int = 0o644) -> Entry:
    return (name, 0o100000 | perms, data)


def link(name: str, target: str) -> Entry:
    return (name, 0o120777, target.encode())


def make_crafted_eif(path: Path, customer: Sequence[Entry]) -> Path:
    """An EIF whose customer ramdisk is exactly ``customer`` (for images crafted to attack the
    runner: a ``rootfs`` or ``cmd`` that is a symbolic link, ...)."""
    bootstrap = newc([d("dev"), f("init", b"#!stand-in init\n", 0o755), f("nsm.ko", b"ko", 0o755)])
    write_eif(
        path,
        kernel=b"synthetic kernel",
        cmdline="console=ttyS0",
        ramdisks=[bootstrap, newc(customer)],
        metadata=IdentityInfo("crafted", "1.0", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )
    return path


def make_eif(
    path: Path,
    *,
    cmd: Sequence[str],
    env: Sequence[str] = ("PATH=/usr/bin:/bin",),
    files: Sequence[Entry] = (),
    signer: object = None,
) -> Path:
    bootstrap = newc([d("dev"), f("init", b"#!stand-in init\n", 0o755), f("nsm.ko", b"ko", 0o755)])
    customer = newc(
        [d("rootfs"), *files, d("rootfs/tmp"), d("rootfs/proc"), d("rootfs/dev")]
        + [
            f("cmd", "".join(c + "\n" for c in cmd).encode()),
            f("env", "".join(e + "\n" for e in env).encode()),
        ]
    )
    write_eif(
        path,
        kernel=b"synthetic kernel",
        cmdline="console=ttyS0",
        ramdisks=[bootstrap, customer],
        metadata=IdentityInfo("test-app", "1.0", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
        signer=signer,  # type: ignore[arg-type]
    )
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EnclaveStore]:
    s = EnclaveStore(tmp_path / "state")
    yield s
    from enclavekit.run import runner

    for record in s.all():
        runner.terminate_enclave(record, store=s, timeout=5)


BigEntry = tuple[str, int, bytes | int]  # as Entry; an int is that many bytes of 0xA5, streamed


def newc_chunks(entries: Sequence[BigEntry], chunk: int = 1 << 20) -> Iterator[bytes]:
    """:func:`newc` as a stream of chunks, so a test can build a ramdisk larger than it wants to
    hold: a file's data given as an ``int`` is generated ``chunk`` bytes at a time."""
    offset = 0
    filler = b"\xa5" * chunk

    def padding(n: int) -> bytes:
        return b"\0" * (-n % 4)

    items = list(entries) + [("TRAILER!!!", 0, b"")]
    for ino, (name, mode, data) in enumerate(items, start=1):
        raw = name.encode() + b"\0"
        size = data if isinstance(data, int) else len(data)
        fields = [ino, mode, 0, 0, 1, 1700000000, size, 0, 0, 0, 0, len(raw), 0]
        head = b"070701" + b"".join(b"%08x" % f for f in fields) + raw
        head += padding(offset + len(head))
        offset += len(head)
        yield head
        if isinstance(data, int):
            left = data
            while left:
                piece = filler[: min(left, chunk)]
                left -= len(piece)
                yield piece
        else:
            yield data
        offset += size
        pad = padding(offset)
        offset += len(pad)
        yield pad
    yield b"\0" * (-offset % 512)
