"""Registries that lie or die: corrupt blobs and manifests, a registry gone mid-pull. None may yield an
EIF, and the blob cache may only ever hold blobs whose bytes match their names."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from enclavekit.cli import cli
from enclavekit.eif.registry import BlobCache, BlobMismatch, pull_image, start_pull
from enclavekit.errors import MalformedInput
from tests.unit.registry.conftest import Pushed
from tests.unit.registry.harness import (
    DyingProxy,
    GatedProxy,
    start_registry,
    storage_blob,
    wait_for,
)


def build(blobs_dir: Path, out: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["build-enclave", "--output-file", str(out), "--blobs", str(blobs_dir), *args]
    )


def _manifest(layout: Path) -> tuple[str, dict[str, object]]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    data = (layout / "blobs/sha256" / digest.partition(":")[2]).read_bytes()
    return digest, json.loads(data)


def _cached(cache_root: Path) -> list[Path]:
    return [p for p in cache_root.rglob("*") if p.is_file()]


@pytest.fixture
def private_storage(pushed: Pushed, tmp_path: Path) -> Path:
    """A copy of the registry storage this test may damage."""
    storage = tmp_path / "storage"
    shutil.copytree(pushed.registry.storage, storage)
    return storage


def test_attack_layer_blob_not_matching_its_digest_is_refused(
    pushed: Pushed, private_storage: Path, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    _, manifest = _manifest(pushed.layouts["corrupt-layer:1"])
    layer_digest = manifest["layers"][1]["digest"]  # type: ignore[index]
    blob = storage_blob(private_storage, layer_digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    blob.write_bytes(bytes(data))
    registry = start_registry(tmp_path / "reg", private_storage)
    try:
        out = tmp_path / "x.eif"
        result = build(blobs_dir, out, "--image", f"docker://{registry.host}/corrupt-layer:1")
    finally:
        registry.stop()
    assert result.exit_code == 2, result.output
    assert "refused" in result.stderr
    assert layer_digest in result.stderr.replace("\n", "")
    assert not out.exists()
    cache_root = tmp_path / "cache" / "enclavekit" / "blobs"
    assert not (cache_root / "sha256" / layer_digest.partition(":")[2]).exists()
    assert list((cache_root / "tmp").iterdir()) == []


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_attack_manifest_not_matching_its_digest_is_refused(
    by: str, pushed: Pushed, private_storage: Path, isolated: Path, tmp_path: Path
) -> None:
    digest, _ = _manifest(pushed.layouts["corrupt-manifest:1"])
    blob = storage_blob(private_storage, digest)
    data = blob.read_bytes()
    assert b'"schemaVersion": 2' in data
    blob.write_bytes(data.replace(b'"schemaVersion": 2', b'"schemaVersion":\t2'))  # same size
    registry = start_registry(tmp_path / "reg", private_storage)
    cache = BlobCache(tmp_path / "blobs")
    ref = f"{registry.host}/corrupt-manifest" + (":1" if by == "tag" else f"@{digest}")
    try:
        with pytest.raises(MalformedInput, match="refused"):
            pull_image(ref, cache=cache)
    finally:
        registry.stop()
    assert not (tmp_path / "blobs").exists() or _cached(tmp_path / "blobs") == []


def test_attack_registry_down_mid_pull_leaves_no_eif_and_no_poisoned_cache(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    proxy = DyingProxy(pushed.registry.host, cut_after=1 << 20)  # the 6 MiB layer is cut at ~1 MiB
    out = tmp_path / "big.eif"
    result = build(blobs_dir, out, "--image", f"docker://{proxy.host}/big:1")
    assert proxy.dead.is_set()
    assert result.exit_code == 2, result.output
    assert "stopped answering" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".big.eif")] == []
    cache_root = tmp_path / "cache" / "enclavekit" / "blobs"
    _, manifest = _manifest(pushed.layouts["big:1"])
    big = manifest["layers"][1]  # type: ignore[index]
    assert not (cache_root / "sha256" / big["digest"].partition(":")[2]).exists()
    assert list((cache_root / "tmp").iterdir()) == []
    # The same cache then serves a complete pull from the live registry.
    again = build(blobs_dir, out, "--image", f"docker://{pushed.registry.host}/big:1")
    assert again.exit_code == 0, again.output
    cached = cache_root / "sha256" / big["digest"].partition(":")[2]
    assert cached.stat().st_size == big["size"]


def test_attack_damaged_cache_entry_is_rehashed_and_replaced(
    pushed: Pushed, isolated: Path, tmp_path: Path
) -> None:
    cache = BlobCache(tmp_path / "blobs")
    ref = f"{pushed.registry.host}/app:v1"
    first = pull_image(ref, cache=cache)
    path = Path(first.image.layers[1].location.path)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    second = pull_image(ref, cache=cache)
    assert Path(second.image.layers[1].location.path).read_bytes() == good


def test_cache_hit_and_miss_give_the_same_image(pushed: Pushed, tmp_path: Path) -> None:
    """The cache may skip a download only for a blob it provably has: same image either way."""
    cache = BlobCache(tmp_path / "blobs")
    ref = f"{pushed.registry.host}/app:v1"
    cold = pull_image(ref, cache=cache)
    warm = pull_image(ref, cache=cache)
    fresh = pull_image(ref, cache=BlobCache(tmp_path / "other"))
    assert cold.manifest_digest == warm.manifest_digest == fresh.manifest_digest
    assert cold.image.config == warm.image.config == fresh.image.config
    assert [x.digest for x in cold.image.layers] == [x.digest for x in fresh.image.layers]
    for a, b in zip(warm.image.layers, fresh.image.layers, strict=True):
        assert Path(a.location.path).read_bytes() == Path(b.location.path).read_bytes()


def test_store_refuses_oversized_and_mismatching_streams(tmp_path: Path) -> None:
    import hashlib

    cache = BlobCache(tmp_path)
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(BlobMismatch, match="more than"):
        cache.store(digest, 999, iter([data]), "blob")
    with pytest.raises(BlobMismatch, match="hash to"):
        cache.store(digest, 1000, iter([b"y" * 1000]), "blob")
    with pytest.raises(BlobMismatch, match="expected 1000 bytes"):
        cache.store(digest, 1000, iter([data[:10]]), "blob")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert cache.lookup(digest, 1000) is None
    assert cache.store(digest, 1000, iter([data[:500], data[500:]]), "blob").read_bytes() == data
    assert cache.lookup(digest, 1000) is not None


def test_concurrent_pulls_share_the_cache(pushed: Pushed, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache_root = tmp_path / "blobs"
    ref = f"{pushed.registry.host}/big:1"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: pull_image(ref, cache=BlobCache(cache_root)), range(3)))
    assert len({r.manifest_digest for r in results}) == 1
    assert list((cache_root / "tmp").iterdir()) == []
    for layer in results[0].image.layers:
        import hashlib

        data = Path(layer.location.path).read_bytes()
        assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_stale_temporary_files_of_killed_downloads_are_removed(tmp_path: Path) -> None:
    import hashlib
    import os
    import time

    from enclavekit.eif.registry.cache import STALE_TMP_SECONDS

    cache = BlobCache(tmp_path)
    (tmp_path / "tmp").mkdir()
    stale, fresh = tmp_path / "tmp" / "sha256-old.x", tmp_path / "tmp" / "sha256-new.y"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"another build's download in progress")
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    data = b"blob"
    cache.store("sha256:" + hashlib.sha256(data).hexdigest(), len(data), iter([data]), "blob")
    assert not stale.exists()
    assert fresh.exists()


@pytest.mark.parametrize("status", [503, 429])
def test_transient_registry_errors_are_retried(status: int, pushed: Pushed, tmp_path: Path) -> None:
    from tests.unit.registry.harness import FlakyFront

    front = FlakyFront(pushed.registry.host, fail=2, status=status)
    try:
        pulled = pull_image(f"{front.host}/app:v1", cache=BlobCache(tmp_path / "blobs"))
    finally:
        front.stop()
    assert len(pulled.image.layers) == 2
    assert front.blob_requests == 2 + 3  # two refused, then config + two layers


def test_registry_that_keeps_failing_is_exit_2(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    from tests.unit.registry.harness import FlakyFront

    front = FlakyFront(pushed.registry.host, fail=1000)
    out = tmp_path / "x.eif"
    try:
        result = build(blobs_dir, out, "--image", f"docker://{front.host}/app:v1")
    finally:
        front.stop()
    assert result.exit_code == 2, result.output
    assert "HTTP 503" in result.stderr
    assert not out.exists()


def test_pull_never_without_a_daemon_is_exit_2(
    pushed: Pushed,
    isolated: Path,
    tmp_path: Path,
    blobs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "x.eif"
    result = build(
        blobs_dir, out, "--docker-uri", f"{pushed.registry.host}/app:v1", "--pull", "never"
    )
    assert result.exit_code == 2, result.output
    assert "docker client" in result.stderr
    assert not out.exists()


# -- building while the layers arrive (start_pull) ---------------------------------------------------


def test_build_reads_each_layer_as_soon_as_it_is_verified(pushed: Pushed, tmp_path: Path) -> None:
    """Layer 0 is usable while layer 1 (the 6 MiB one) is still stalled in transit; layer 1's file
    does not exist until the whole blob arrived and matched its digest."""
    _, manifest = _manifest(pushed.layouts["big:1"])
    first_size = manifest["layers"][0]["size"]  # type: ignore[index]
    proxy = GatedProxy(pushed.registry.host, hold_after=64 << 10)  # well into layer 1
    try:
        with start_pull(f"{proxy.host}/big:1", cache=BlobCache(tmp_path / "blobs")) as pending:
            first, second = pending.image.layers
            assert first.wait is not None and second.wait is not None
            first.wait()
            assert Path(first.location.path).stat().st_size == first_size
            wait_for(proxy.holding.is_set)
            assert not Path(second.location.path).exists()
            proxy.release.set()
            second.wait()
            assert Path(second.location.path).stat().st_size == second.location.size
            pulled = pending.finish()
    finally:
        proxy.release.set()
        proxy.kill()
    assert all(layer.wait is None for layer in pulled.image.layers)
    direct = pull_image(f"{pushed.registry.host}/big:1", cache=BlobCache(tmp_path / "blobs"))
    assert pulled.image.layers == direct.image.layers
    assert pulled.image.config == direct.image.config


def test_attack_layer_failing_mid_build_is_raised_where_the_build_waits(
    pushed: Pushed, private_storage: Path, tmp_path: Path
) -> None:
    """A corrupt second layer: the first layer is served, the second one's wait raises the refusal
    (and keeps raising it), and the cache never holds the corrupt bytes."""
    _, manifest = _manifest(pushed.layouts["corrupt-layer:1"])
    layer_digest = manifest["layers"][1]["digest"]  # type: ignore[index]
    blob = storage_blob(private_storage, layer_digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    registry = start_registry(tmp_path / "reg", private_storage)
    cache_root = tmp_path / "blobs"
    try:
        with start_pull(f"{registry.host}/corrupt-layer:1", cache=BlobCache(cache_root)) as pending:
            first, second = pending.image.layers
            assert first.wait is not None and second.wait is not None
            first.wait()
            for _ in range(2):
                with pytest.raises(BlobMismatch, match="refused"):
                    second.wait()
            with pytest.raises(BlobMismatch):
                pending.finish()
    finally:
        registry.stop()
    assert not (cache_root / "sha256" / layer_digest.partition(":")[2]).exists()
    assert list((cache_root / "tmp").iterdir()) == []


def test_closing_a_pull_mid_download_stops_it_and_leaves_no_blob(
    pushed: Pushed, tmp_path: Path
) -> None:
    """A build that fails (or is interrupted) closes the pull: the download thread stops, later
    layers say why they never arrived, and no partial blob stays in the cache."""
    proxy = GatedProxy(pushed.registry.host, hold_after=64 << 10)
    cache_root = tmp_path / "blobs"
    try:
        pending = start_pull(f"{proxy.host}/big:1", cache=BlobCache(cache_root))
        with pending:
            wait_for(proxy.holding.is_set)
        proxy.release.set()  # the stalled read returns; the thread sees the stop and ends
        pending._thread.join(timeout=10)
        assert not pending._thread.is_alive()
    finally:
        proxy.release.set()
        proxy.kill()
    second = pending.image.layers[1]
    assert second.wait is not None
    with pytest.raises(Exception, match="stopped before this layer arrived"):
        second.wait()
    assert not Path(second.location.path).exists()
    assert list((cache_root / "tmp").iterdir()) == []


def test_a_layer_is_read_while_it_arrives_and_verified_after(
    pushed: Pushed, tmp_path: Path
) -> None:
    """The build unpacks a gzip layer while it downloads: its first bytes are readable while the rest
    is stalled in transit, before the blob is in the cache; the whole read equals the blob."""
    _, manifest = _manifest(pushed.layouts["big:1"])
    big = manifest["layers"][1]  # type: ignore[index]
    stored = storage_blob(pushed.registry.storage, big["digest"]).read_bytes()
    first_size = manifest["layers"][0]["size"]  # type: ignore[index]
    proxy = GatedProxy(pushed.registry.host, hold_after=first_size + (2 << 20))
    try:
        with start_pull(f"{proxy.host}/big:1", cache=BlobCache(tmp_path / "blobs")) as pending:
            second = pending.image.layers[1]
            assert second.stream is not None and second.wait is not None
            with second.stream() as early:
                head = early.read(1 << 20)  # arrives before the proxy holds
                wait_for(proxy.holding.is_set)
                assert head == stored[: 1 << 20]
                assert not Path(second.location.path).exists()  # not verified, not cached
                proxy.release.set()
                rest = early.read()
            assert head + rest == stored
            second.wait()
            assert Path(second.location.path).read_bytes() == stored
    finally:
        proxy.release.set()
        proxy.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_attack_signal_while_the_build_waits_for_a_stalled_layer_leaves_nothing(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path, signum: int
) -> None:
    """The build is reading a layer that stopped arriving: a stop signal ends it with 128 + the
    signal, no EIF or temporary file beside the output, and no partial blob in the cache."""
    _, manifest = _manifest(pushed.layouts["big:1"])
    first_size = manifest["layers"][0]["size"]  # type: ignore[index]
    proxy = GatedProxy(pushed.registry.host, hold_after=first_size + (2 << 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    exe = str(Path(sys.executable).parent / "enclavekit")
    try:
        proc = subprocess.Popen(
            [exe, "build-enclave", "--image", f"docker://{proxy.host}/big:1",
             "--output-file", str(out_dir / "big.eif"), "--blobs", str(blobs_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(proxy.holding.is_set)
        time.sleep(0.3)  # let the build reach the stalled layer
        assert proc.poll() is None
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proxy.release.set()
        proxy.kill()
    assert proc.returncode == 128 + signum, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert list(out_dir.iterdir()) == []
    cache_root = tmp_path / "cache" / "enclavekit" / "blobs"
    big = manifest["layers"][1]  # type: ignore[index]
    assert not (cache_root / "sha256" / big["digest"].partition(":")[2]).exists()
    assert list((cache_root / "tmp").iterdir()) == []


def test_a_follower_waits_for_the_next_attempt_when_a_failed_attempts_file_is_gone(
    tmp_path: Path,
) -> None:
    """A retried download removes its first file: the reader asks for a file other than that one
    (it does not spin on the missing path) and goes on at its offset in the new attempt's file."""
    from enclavekit.eif.registry.pull import _LayerFollower

    second = tmp_path / "attempt-2"
    second.write_bytes(b"0123456789")
    calls: list[tuple[int, str | None]] = []

    def readable(position: int, gone: str | None) -> tuple[str, int, int]:
        calls.append((position, gone))
        if len(calls) == 1:
            return str(tmp_path / "attempt-1"), 10, 1  # removed before it could be opened
        return str(second), 10, 2

    with _LayerFollower(readable, 10, "layer 0") as follower:
        assert follower.read(4) == b"0123"
        assert follower.read() == b"456789"
    assert calls[:2] == [(0, None), (0, str(tmp_path / "attempt-1"))]
