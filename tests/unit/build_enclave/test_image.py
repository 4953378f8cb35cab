"""Image sources: docker-save archives, OCI layouts (dir and tar), configs and the CMD/ENTRYPOINT rule."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.eif.image import (
    Image,
    RootfsDir,
    check_env,
    open_source,
    parse_cmd,
    parse_config,
)
from enclavekit.errors import Error, MalformedInput, UsageError
from tests.unit.build_enclave.factory import (
    F,
    base_layer,
    config,
    docker_archive,
    layer,
    oci_layout,
    sha,
)


@pytest.mark.parametrize("legacy", [True, False])
def test_docker_archive_is_opened(tmp_path: Path, legacy: bool) -> None:
    layers = [base_layer(), layer(F("app", b"x"))]
    image = open_source(str(docker_archive(tmp_path / "img.tar", layers, legacy=legacy)))
    assert isinstance(image, Image)
    assert image.repo_tags == ("hello:v1",)
    assert [layer.diff_id for layer in image.layers] == [sha(x) for x in layers]
    assert image.config.argv() == ("/bin/hello",)
    assert image.config.arch == "x86_64"
    assert (image.layers[0].digest is None) == legacy


def test_oci_layout_directory_and_tar(tmp_path: Path) -> None:
    layers = [base_layer()]
    (tmp_path / "dir").mkdir()
    as_dir = open_source(str(oci_layout(tmp_path / "dir", layers)))
    as_tar = open_source(str(oci_layout(tmp_path / "oci.tar", layers, as_tar=True)))
    assert isinstance(as_dir, Image) and isinstance(as_tar, Image)
    assert as_dir.config == as_tar.config
    assert as_dir.layers[0].digest == as_tar.layers[0].digest
    assert as_dir.repo_tags == ("v1",)


def test_oci_ref_selection(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    oci_layout(tmp_path / "dir", [base_layer()], ref="v1")
    assert isinstance(open_source(f"{tmp_path / 'dir'}:v1"), Image)
    with pytest.raises(UsageError, match="ref name 'v2'"):
        open_source(f"{tmp_path / 'dir'}:v2")


def test_rootfs_directory_is_recognised(tmp_path: Path) -> None:
    assert isinstance(open_source(str(tmp_path)), RootfsDir)


def test_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        open_source(str(tmp_path / "nope.tar"))


@pytest.mark.parametrize(
    ("kwargs", "argv"),
    [
        ({"cmd": ["/a"], "entrypoint": ["/e"]}, ("/a",)),  # Cmd wins; Entrypoint ignored
        ({"cmd": [], "entrypoint": ["/e"]}, ()),  # even an empty Cmd wins
        ({"omit_cmd": True, "entrypoint": ["/e", "x"]}, ("/e", "x")),
    ],
)
def test_cmd_entrypoint_rule_matches_nitro_cli(kwargs: dict, argv: tuple[str, ...]) -> None:
    assert parse_config(config([], **kwargs)).argv() == argv


def test_neither_cmd_nor_entrypoint_is_refused() -> None:
    with pytest.raises(MalformedInput, match="neither Cmd nor Entrypoint"):
        parse_config(config([], omit_cmd=True)).argv()


def test_unsupported_architecture_is_refused() -> None:
    with pytest.raises(MalformedInput, match="amd64"):
        _ = parse_config(config([], arch="s390x")).arch


def test_config_with_duplicate_keys_is_refused() -> None:
    with pytest.raises(MalformedInput, match="duplicate"):
        parse_config(b'{"architecture": "amd64", "architecture": "arm64"}')


def test_config_with_wrong_types_is_refused() -> None:
    with pytest.raises(MalformedInput, match="list of strings"):
        parse_config(json.dumps({"config": {"Cmd": "/bin/sh"}}).encode())


def test_missing_config_is_refused(tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "img.tar", [base_layer()])
    import tarfile

    broken = tmp_path / "broken.tar"
    with tarfile.open(path) as src, tarfile.open(broken, "w") as dst:
        for member in src:
            if member.name.endswith(".json") and member.name != "manifest.json":
                continue
            dst.addfile(member, src.extractfile(member))
    with pytest.raises(MalformedInput, match="missing"):
        open_source(str(broken))


def test_oci_config_digest_mismatch_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    oci_layout(tmp_path / "dir", [base_layer()])
    index = json.loads((tmp_path / "dir" / "index.json").read_text())
    manifest_path = tmp_path / "dir" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(manifest_path.read_text())
    config_path = tmp_path / "dir" / "blobs" / "sha256" / manifest["config"]["digest"][7:]
    config_path.write_bytes(config_path.read_bytes().replace(b"hello", b"hellO"))
    with pytest.raises(MalformedInput, match="digest mismatch"):
        open_source(str(tmp_path / "dir"))


def test_digest_path_traversal_is_refused(tmp_path: Path) -> None:
    """A descriptor digest like ``sha256:../../x`` must not name a file outside blobs/."""
    (tmp_path / "dir").mkdir()
    oci_layout(tmp_path / "dir", [base_layer()])
    index = json.loads((tmp_path / "dir" / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (tmp_path / "dir" / "index.json").write_text(json.dumps(index))
    with pytest.raises(MalformedInput, match="not a sha256"):
        open_source(str(tmp_path / "dir"))


def test_docker_archive_member_symlink_escape_is_refused(tmp_path: Path) -> None:
    """A docker-save member that is a symlink out of the archive is refused."""
    import io
    import tarfile

    path = tmp_path / "img.tar"
    cfg = config([sha(base_layer())])
    with tarfile.open(path, "w") as archive:
        for name, data in {
            "c.json": cfg,
            "manifest.json": json.dumps([{"Config": "c.json", "Layers": ["l/layer.tar"]}]).encode(),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../outside.tar"
        archive.addfile(link)
    with pytest.raises(MalformedInput, match="path traversal"):
        open_source(str(path))


def test_manifest_layer_count_must_match_diff_ids(tmp_path: Path) -> None:
    bad = config([sha(b"one"), sha(b"two")])
    with pytest.raises(MalformedInput, match="diff_ids"):
        open_source(str(docker_archive(tmp_path / "img.tar", [base_layer()], config_bytes=bad)))


def test_not_an_image_archive(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(layer(F("a", b"x")))
    with pytest.raises(MalformedInput, match="neither"):
        open_source(str(path))
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(MalformedInput, match="not a readable"):
        open_source(str(path))


def test_multi_image_archive_is_refused(tmp_path: Path) -> None:
    path = docker_archive(tmp_path / "img.tar", [base_layer()])
    import tarfile

    with tarfile.open(path) as src:
        manifest = json.loads(src.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest  # sanity
    with tarfile.open(path, "a") as archive:
        import io

        data = json.dumps(manifest * 2).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(UsageError, match="holds 2 images"):
        open_source(str(path))


def test_cmd_and_env_options() -> None:
    assert parse_cmd('["/bin/app", "a b"]') == ("/bin/app", "a b")
    assert parse_cmd("/bin/app -v") == ("/bin/app", "-v")
    assert parse_cmd(None) is None
    with pytest.raises(UsageError):
        parse_cmd("[1, 2]")
    assert check_env(["A=1"]) == ("A=1",)
    with pytest.raises(UsageError):
        check_env(["NOEQUALS"])


def test_deeply_nested_config_is_refused() -> None:
    with pytest.raises(MalformedInput):
        parse_config(b"[" * 100_000 + b"]" * 100_000)


def test_config_with_nan_or_trailing_bytes_is_refused() -> None:
    with pytest.raises(MalformedInput):
        parse_config(b'{"architecture": NaN}')
    with pytest.raises(MalformedInput):
        parse_config(b'{"architecture": "amd64"} trailing')
    with pytest.raises(MalformedInput):
        parse_config(b"\xff\xfe")


def test_oversized_manifest_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import enclavekit.eif.image as image_module

    monkeypatch.setattr(image_module, "MAX_JSON_SIZE", 64)
    with pytest.raises(MalformedInput, match="refusing more than 64"):
        open_source(str(docker_archive(tmp_path / "img.tar", [base_layer()])))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=4000))
def test_random_archives_raise_only_enclavekit_errors(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("r") / "x.tar"
    path.write_bytes(data)
    with contextlib.suppress(Error):
        open_source(str(path))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["manifest.json", "config.json"]))
def test_random_json_members_raise_only_enclavekit_errors(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, which: str
) -> None:
    import io
    import tarfile

    path = tmp_path_factory.mktemp("r") / "x.tar"
    members = {
        "manifest.json": json.dumps([{"Config": "config.json", "Layers": []}]).encode(),
        "config.json": config([]),
    }
    members[which] = data
    with tarfile.open(path, "w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    with contextlib.suppress(Error):
        image = open_source(str(path))
        assert isinstance(image, Image)
        with contextlib.suppress(Error):
            image.config.argv()


def _multi_arch_layout(root: Path) -> None:
    """An OCI layout whose index.json points to an image index with amd64 and arm64 images."""
    root.mkdir()
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    manifests = []
    for arch in ("arm64", "amd64"):
        data = layer(F(f"only-{arch}", b"x"))
        cfg = config([sha(data)], arch=arch)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(cfg)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(data)}],
            }
        ).encode()
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "platform": {"architecture": arch, "os": "linux"},
                **put(manifest),
            }
        )
    attestation = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        "digest": "sha256:" + "0" * 64,
        "size": 1,
    }
    nested = json.dumps({"schemaVersion": 2, "manifests": [*manifests, attestation]}).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
                **put(nested),
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.parametrize(
    ("arch", "expected"), [(None, "x86_64"), ("x86_64", "x86_64"), ("aarch64", "aarch64")]
)
def test_multi_arch_index_picks_the_platform(
    tmp_path: Path, arch: str | None, expected: str
) -> None:
    _multi_arch_layout(tmp_path / "oci")
    image = open_source(str(tmp_path / "oci"), arch=arch)
    assert isinstance(image, Image)
    assert image.config.arch == expected
    assert image.repo_tags == ("multi",)


@pytest.mark.parametrize("legacy", [True, False])
def test_docker_archive_config_digest_mismatch_is_refused(tmp_path: Path, legacy: bool) -> None:
    """A config whose bytes do not match the digest in its name."""
    import io
    import tarfile

    path = docker_archive(tmp_path / "img.tar", [base_layer()], legacy=legacy)
    tampered = tmp_path / "t.tar"
    with tarfile.open(path) as src, tarfile.open(tampered, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if (member.name.endswith(".json") and member.name != "manifest.json") or (
                not legacy and data.startswith(b'{"architecture"')
            ):
                data = data.replace(b"/bin/hello", b"/bin/evil!")
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(MalformedInput, match="does not match its digest"):
        open_source(str(tampered))
