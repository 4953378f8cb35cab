"""Registries that lie or die: corrupt blobs and manifests, a registry gone mid-pull. None may yield an
EIF, and the blob cache may only ever hold blobs whose bytes match their names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from enclavekit.cli import cli
from enclavekit.eif.registry import BlobCache, BlobMismatch, pull_image
from enclavekit.errors import MalformedInput
from tests.unit.registry.conftest import Pushed
from tests.unit.registry.harness import DyingProxy, start_registry, storage_blob


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
