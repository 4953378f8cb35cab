"""The build reads a downloading layer from the download's own batches (held in memory) instead of the
cache file: the same verdict and the same unpacked bytes as reading the file and hashing it, whatever
the download does — honest, corrupt, retried after the build read some of it, retried with other bytes.

The download is scripted (a stand-in for :class:`~enclavekit.eif.registry.client.RegistryClient` that
yields chosen bytes and fails where told), so each retry lands exactly after the build read bytes.
The real registry tests (test_pull_*) run the same code against Debian's docker-registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclavekit.eif.build import DigestChecks, unpacked_layer
from enclavekit.eif.image import LayerBlob, SourceRestarted, parse_config
from enclavekit.eif.layers import Spool
from enclavekit.eif.registry.cache import BlobCache, BlobMismatch
from enclavekit.eif.registry.client import RegistryUnavailable, _Retry
from enclavekit.eif.registry.pull import (
    MAX_HELD,
    PullInProgress,
    _Descriptor,
    _HeldReader,
    _LayerFollower,
)
from enclavekit.eif.registry.reference import parse_reference
from enclavekit.errors import MalformedInput
from tests.unit.build_enclave.factory import F, config, layer, sha

TAR = layer(
    F("data", kind="dir", mode=0o755),
    F("data/blob.bin", hashlib.shake_256(b"held batches").digest(3 << 20)),
)
BLOB = gzip.compress(TAR, compresslevel=1, mtime=0)
CHUNK = 256 << 10


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


class ScriptedClient:
    """Serves one attempt per entry of ``attempts``: (bytes, cut): the bytes in 256 KiB chunks, and
    with ``cut`` set, a transport failure once ``cut`` bytes went out and the build read some."""

    def __init__(self, attempts: list[tuple[bytes, int | None]], build_read: threading.Event):
        self._attempts = list(attempts)
        self._build_read = build_read

    @contextlib.contextmanager
    def blob_stream(self, digest: str, what: str) -> Iterator[Iterator[bytes]]:
        data, cut = self._attempts.pop(0)
        yield self._chunks(data, cut)

    def _chunks(self, data: bytes, cut: int | None) -> Iterator[bytes]:
        for start in range(0, len(data), CHUNK):
            if cut is not None and start >= cut:
                assert self._build_read.wait(10), "the build read nothing"
                raise _Retry("connection reset")
            yield data[start : start + CHUNK]

    def retrying(self, attempt_blob: Callable[[], Path], what: str) -> Path:
        for _ in range(len(self._attempts)):
            try:
                return attempt_blob()
            except _Retry:
                continue
        raise RegistryUnavailable(f"{what}: stopped answering")

    def close(self) -> None:
        pass


class _Noting:
    """A layer reader that notes when the build has read bytes through it."""

    def __init__(self, reader: Any, read: threading.Event) -> None:
        self._reader = reader
        self._read = read
        self.source_checks_digest = reader.source_checks_digest
        self.kinds = type(reader).__name__

    def read(self, n: int = -1) -> bytes:
        data = self._reader.read(n)
        if data:
            self._read.set()
        return data

    def checked(self) -> bool:
        return bool(self._reader.checked())

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> _Noting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _build_layer(
    tmp_path: Path,
    attempts: list[tuple[bytes, int | None]],
    *,
    hold: int,
    diff_id: str | None = None,
    blob_bytes: bytes = BLOB,
) -> tuple[str, bytes | None, list[str]]:
    """Pull one scripted layer while the build unpacks it: (outcome, unpacked tar or None, the
    kinds of reader the build got)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    build_read = threading.Event()
    digest = sha(blob_bytes)
    image_config = parse_config(config([diff_id or sha(TAR)]))
    pending = PullInProgress(
        parse_reference(f"127.0.0.1:5000/held@{sha(b'manifest')}"),
        sha(b"manifest"),
        image_config,
        [
            (
                _Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", digest, len(blob_bytes)),
                "layer 0",
            )
        ],
        ScriptedClient(attempts, build_read),  # type: ignore[arg-type]
        BlobCache(tmp_path / "cache"),
        None,
        hold=hold,
    )
    kinds: list[str] = []
    original = pending.image.layers[0]
    assert original.stream is not None

    def stream() -> _Noting:
        assert original.stream is not None
        reader = _Noting(original.stream(), build_read)
        kinds.append(reader.kinds)
        return reader

    blob: LayerBlob = dataclasses.replace(original, stream=stream)
    spool = Spool(str(tmp_path / "spool"))
    try:
        with pending, DigestChecks() as checks:
            location = unpacked_layer(blob, spool, checks)
            checks.wait()
            spool.flush()
            with open(location.path, "rb") as handle:
                handle.seek(location.offset)
                unpacked = handle.read(location.size)
            assert location.offset == 0  # a restarted layer was rewound, not appended twice
            return "built", unpacked, kinds
    except (BlobMismatch, MalformedInput, RegistryUnavailable) as exc:
        return f"{type(exc).__name__}", None, kinds
    finally:
        spool.close()


SCENARIOS: dict[str, list[tuple[bytes, int | None]]] = {
    "honest": [(BLOB, None)],
    "corrupt blob": [(_flipped(BLOB, len(BLOB) // 2), None)],
    "retried after the build read some": [(BLOB, 4 * CHUNK), (BLOB, None)],
    "retried after reading bytes the retry does not send": [
        (_flipped(BLOB, 100), 4 * CHUNK),
        (BLOB, None),
    ],
    "retried into corrupt bytes": [(BLOB, 4 * CHUNK), (_flipped(BLOB, len(BLOB) - 10), None)],
    "registry gone after the build read some": [(BLOB, 4 * CHUNK)],
}
EXPECTED = {
    "honest": "built",
    "corrupt blob": "BlobMismatch",
    "retried after the build read some": "built",
    "retried after reading bytes the retry does not send": "built",
    "retried into corrupt bytes": "BlobMismatch",
    "registry gone after the build read some": "RegistryUnavailable",
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_held_batches_give_the_verdict_and_bytes_of_the_hashed_file(
    scenario: str, tmp_path: Path
) -> None:
    held = _build_layer(tmp_path / "held", SCENARIOS[scenario], hold=MAX_HELD)
    from_file = _build_layer(tmp_path / "file", SCENARIOS[scenario], hold=0)
    assert held[0] == from_file[0] == EXPECTED[scenario]
    assert held[1] == from_file[1]
    if held[0] == "built":
        assert held[1] == TAR
    assert held[2] == [_HeldReader.__name__]  # the fast path was taken...
    assert from_file[2] == [_LayerFollower.__name__]  # ...and here not


def test_attack_wrong_diff_id_is_refused_on_both_paths(tmp_path: Path) -> None:
    """The download checks only the blob's digest: the uncompressed tar is still hashed by the
    build and compared with the config's diff_id, with or without held batches."""
    wrong = sha(b"another tar")
    for hold in (MAX_HELD, 0):
        outcome, _, _ = _build_layer(tmp_path / str(hold), [(BLOB, None)], hold=hold, diff_id=wrong)
        assert outcome == "MalformedInput"


def test_a_held_reader_that_is_restarted_says_so_instead_of_returning_bytes(tmp_path: Path) -> None:
    """The reader itself, without the build around it: after a retry it raises SourceRestarted and
    ``checked()`` stays False, so nothing it returned can pass as verified."""
    build_read = threading.Event()
    image_config = parse_config(config([sha(TAR)]))
    pending = PullInProgress(
        parse_reference(f"127.0.0.1:5000/held@{sha(b'manifest')}"),
        sha(b"manifest"),
        image_config,
        [(_Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", sha(BLOB), len(BLOB)), "l0")],
        ScriptedClient([(BLOB, 4 * CHUNK), (BLOB, None)], build_read),  # type: ignore[arg-type]
        BlobCache(tmp_path / "cache"),
        None,
    )
    with pending:
        stream = pending.image.layers[0].stream
        assert stream is not None
        with stream() as reader:
            assert isinstance(reader, _HeldReader)
            first = reader.read(CHUNK)
            build_read.set()
            assert first == BLOB[:CHUNK]
            with pytest.raises(SourceRestarted):
                while reader.read(CHUNK):
                    pass
            pending.image.layers[0].wait()  # type: ignore[misc]
            assert not reader.checked()


def test_a_download_far_ahead_drops_what_nobody_reads_and_that_layer_is_hashed_from_its_file(
    tmp_path: Path,
) -> None:
    """With less held memory than the layer, the finished download holds nothing for a build that
    comes later: the build gets the file reader (and hashes), and the bytes are the same."""
    outcome, unpacked, kinds = _build_layer_late(tmp_path, hold=CHUNK)
    assert (outcome, unpacked, kinds) == ("built", TAR, [_LayerFollower.__name__])
    outcome, unpacked, kinds = _build_layer_late(tmp_path / "big", hold=MAX_HELD)
    assert (outcome, unpacked, kinds) == ("built", TAR, [_HeldReader.__name__])


def _build_layer_late(tmp_path: Path, *, hold: int) -> tuple[str, bytes | None, list[str]]:
    """As _build_layer, but the build starts only once the download finished."""
    original_init = PullInProgress.__init__

    def init(self: PullInProgress, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._thread.join(10)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PullInProgress, "__init__", init)
        return _build_layer(tmp_path, [(BLOB, None)], hold=hold)


def test_attack_blob_that_stops_being_gzip_fails_without_stalling_the_download(
    tmp_path: Path,
) -> None:
    """The registry's blob matches its digest but is gzip only in its first bytes: the build stops at
    the corrupt data while the download still waits for it to take held bytes (hold smaller than
    the layer). Closing the reader lets the download finish, so the build reports the bad gzip
    instead of waiting forever for the layer's verdict."""
    bad = BLOB[:CHUNK] + hashlib.shake_256(b"not deflate").digest(3 << 20)
    result: list[tuple[str, bytes | None, list[str]]] = []
    worker = threading.Thread(
        target=lambda: result.append(
            _build_layer(tmp_path, [(bad, None)], hold=CHUNK, blob_bytes=bad)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the build and the download wait for each other"
    assert result[0][:2] == ("MalformedInput", None)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut_chunks=st.one_of(st.none(), st.integers(4, len(BLOB) // CHUNK)),
    first_flip=st.one_of(st.none(), st.integers(0, len(BLOB) - 1)),
    second_flip=st.one_of(st.none(), st.integers(0, len(BLOB) - 1)),
)
def test_held_batches_and_the_file_agree_on_any_download(
    tmp_path: Path, cut_chunks: int | None, first_flip: int | None, second_flip: int | None
) -> None:
    """Property: whatever the first attempt sends (a flipped byte anywhere or not), wherever it is cut
    (or not), and whatever a retry sends, both readers give one verdict and the same bytes."""
    first = BLOB if first_flip is None else _flipped(BLOB, first_flip)
    second = BLOB if second_flip is None else _flipped(BLOB, second_flip)
    attempts: list[tuple[bytes, int | None]] = [
        (first, None if cut_chunks is None else cut_chunks * CHUNK)
    ]
    if cut_chunks is not None:
        attempts.append((second, None))
    case = (
        tmp_path / hashlib.sha256(repr((cut_chunks, first_flip, second_flip)).encode()).hexdigest()
    )
    held = _build_layer(case / "held", attempts, hold=MAX_HELD)
    from_file = _build_layer(case / "file", attempts, hold=0)
    assert held[:2] == from_file[:2]
    final = attempts[-1][0]
    assert (held[0] == "built") == (final == BLOB)


def test_a_layer_found_in_the_cache_after_the_build_asked_for_it_is_read_from_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build asks for the layer's bytes before the download looked in the cache (a rebuild, the
    lookup re-hashing a big file): no batch ever arrives, the reader says so, and the build reads the
    cached file instead of failing."""
    import time

    cache_dir = tmp_path / "cache"
    BlobCache(cache_dir).store(sha(BLOB), len(BLOB), iter([BLOB]), "layer 0")
    lookup = BlobCache.lookup

    def slow_lookup(self: BlobCache, digest: str, size: int | None) -> Path | None:
        time.sleep(0.2)  # the build claims the layer meanwhile
        return lookup(self, digest, size)

    monkeypatch.setattr(BlobCache, "lookup", slow_lookup)
    outcome, unpacked, kinds = _build_layer(tmp_path, [], hold=MAX_HELD)
    assert (outcome, unpacked, kinds) == ("built", TAR, [_HeldReader.__name__])
