"""``build-enclave`` from real registries (docker-registry 2.8 + skopeo): tags, digests, multi-arch,
TLS, basic and token auth, and the failures that must never yield an EIF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from enclavekit.cli import cli
from tests.unit.registry.conftest import PASSWORD, USER, Pushed
from tests.unit.registry.harness import Registry, TlsFiles, skopeo_export


def build(blobs_dir: Path, out: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["build-enclave", "--output-file", str(out), "--blobs", str(blobs_dir), *args],
    )


def describe(path: Path) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["describe-eif", "--eif-path", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_pull_by_tag_builds(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    out = tmp_path / "app.eif"
    result = build(
        blobs_dir, out, "--docker-uri", f"{pushed.registry.host}/app:v1", "--pull", "always"
    )
    assert result.exit_code == 0, result.output
    assert "Pulling" in result.stderr
    assert json.loads(result.stdout)["Measurements"] == describe(out)["Measurements"]
    meta = describe(out)["Metadata"]
    assert isinstance(meta, dict)
    assert meta["DockerInfo"]["RepoTags"] == [f"{pushed.registry.host}/app:v1"]
    assert describe(out)["ImageName"] == f"{pushed.registry.host}/app"


def test_registry_build_is_byte_identical_to_oci_layout_and_docker_save(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    ref = f"{pushed.registry.host}/app:v1"
    pulled = tmp_path / "pulled.eif"
    assert build(blobs_dir, pulled, "--image", f"docker://{ref}").exit_code == 0
    archive = tmp_path / "saved.tar"
    skopeo_export(ref, f"docker-archive:{archive}:{ref}")
    saved = tmp_path / "saved.eif"
    result = build(blobs_dir, saved, "--image", str(archive))
    assert result.exit_code == 0, result.output
    layout = tmp_path / "layout"
    skopeo_export(ref, f"oci:{layout}:{ref}")
    from_layout = tmp_path / "layout.eif"
    result = build(blobs_dir, from_layout, "--image", str(layout))
    assert result.exit_code == 0, result.output
    assert pulled.read_bytes() == saved.read_bytes()
    assert pulled.read_bytes() == from_layout.read_bytes()


def test_pull_by_digest_and_no_daemon_default(
    pushed: Pushed,
    isolated: Path,
    tmp_path: Path,
    blobs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_tag = tmp_path / "tag.eif"
    result = build(blobs_dir, by_tag, "--image", f"docker://{pushed.registry.host}/app:v1")
    assert result.exit_code == 0, result.output
    index = json.loads((pushed.layouts["app:v1"] / "index.json").read_text())
    digest = index["manifests"][0]["digest"]  # skopeo pushes the layout's manifest bytes unchanged
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no docker client: --pull missing uses the registry
    by_digest = tmp_path / "digest.eif"
    result = build(blobs_dir, by_digest, "--docker-uri", f"{pushed.registry.host}/app@{digest}")
    assert result.exit_code == 0, result.output
    assert "No Docker daemon" in result.stderr
    assert describe(by_digest)["Measurements"] == describe(by_tag)["Measurements"]


def test_multi_arch_index_picks_arch(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    ref = f"docker://{pushed.registry.host}/multi:1"
    amd = tmp_path / "amd.eif"
    result = build(blobs_dir, amd, "--image", ref, "--arch", "amd64")
    assert result.exit_code == 0, result.output
    # arm64 needs the aarch64 kernel blob, which the x86_64 blobs folder lacks: the pull selects the
    # arm64 image (its config says arm64) and the build then asks for the Image kernel.
    arm = tmp_path / "arm.eif"
    result = build(blobs_dir, arm, "--image", ref, "--arch", "arm64/v8")
    assert result.exit_code == 2
    assert "Image" in result.stderr or "aarch64" in result.stderr
    assert not arm.exists()
    result = build(blobs_dir, tmp_path / "x.eif", "--image", ref, "--arch", "arm64")
    assert result.exit_code == 2


def test_missing_tag_exits_2_clearly(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    out = tmp_path / "app.eif"
    result = build(blobs_dir, out, "--image", f"docker://{pushed.registry.host}/app:nope")
    assert result.exit_code == 2, result.output
    assert "has no manifest 'nope'" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_attack_wrong_digest_is_refused_and_nothing_written(
    pushed: Pushed, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    out = tmp_path / "app.eif"
    wrong = "sha256:" + "0" * 64
    result = build(blobs_dir, out, "--image", f"docker://{pushed.registry.host}/app@{wrong}")
    assert result.exit_code == 2, result.output
    assert not out.exists()
    assert not list((isolated.parent / "cache").rglob("sha256/*"))


def test_tls_registry_with_test_ca(
    pushed: Pushed,
    tls_registry: Registry,
    tls_files: TlsFiles,
    isolated: Path,
    tmp_path: Path,
    blobs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = f"docker://{tls_registry.host}/app:v1"
    untrusted = build(blobs_dir, tmp_path / "u.eif", "--image", ref)
    assert untrusted.exit_code == 2, untrusted.output
    assert "not trusted" in untrusted.stderr
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    out = tmp_path / "tls.eif"
    result = build(blobs_dir, out, "--image", ref)
    assert result.exit_code == 0, result.output


def test_insecure_registry_flag_warns(
    tls_registry: Registry, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    out = tmp_path / "tls.eif"
    result = build(
        blobs_dir,
        out,
        "--image",
        f"docker://{tls_registry.host}/app:v1",
        "--insecure-registry",
        tls_registry.host,
    )
    assert result.exit_code == 0, result.output
    assert "not checked" in result.stderr


def _docker_config(directory: Path, host: str, user: str, password: str) -> None:
    import base64

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def test_basic_auth_from_docker_config(
    htpasswd_registry: Registry, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    ref = f"docker://{htpasswd_registry.host}/app:v1"
    anonymous = build(blobs_dir, tmp_path / "a.eif", "--image", ref)
    assert anonymous.exit_code == 2, anonymous.output
    assert "needs credentials" in anonymous.stderr
    _docker_config(isolated, htpasswd_registry.host, USER, PASSWORD)
    result = build(blobs_dir, tmp_path / "ok.eif", "--image", ref)
    assert result.exit_code == 0, result.output


def test_attack_wrong_basic_credentials_exit_2(
    htpasswd_registry: Registry, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    _docker_config(isolated, htpasswd_registry.host, USER, "Xq7-not-the-password")
    out = tmp_path / "x.eif"
    result = build(blobs_dir, out, "--image", f"docker://{htpasswd_registry.host}/app:v1")
    assert result.exit_code == 2, result.output
    assert "refused" in result.stderr
    assert "Xq7-not-the-password" not in result.output  # the password is never echoed
    assert not out.exists()


def test_credential_helper_protocol(
    htpasswd_registry: Registry,
    isolated: Path,
    tmp_path: Path,
    blobs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-enclavekit-test"
    seen = tmp_path / "helper-stdin"
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 1\ncat > {seen}\n'
        f'printf \'{{"ServerURL":"x","Username":"{USER}","Secret":"{PASSWORD}"}}\'\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    (isolated / "config.json").write_text(
        json.dumps({"credHelpers": {htpasswd_registry.host: "enclavekit-test"}})
    )
    result = build(
        blobs_dir, tmp_path / "ok.eif", "--image", f"docker://{htpasswd_registry.host}/app:v1"
    )
    assert result.exit_code == 0, result.output
    assert seen.read_text() == htpasswd_registry.host


def test_token_auth(
    token_registry: Registry, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    ref = f"docker://{token_registry.host}/app:v1"
    _docker_config(isolated, token_registry.host, USER, PASSWORD)
    result = build(blobs_dir, tmp_path / "ok.eif", "--image", ref)
    assert result.exit_code == 0, result.output


def test_attack_wrong_token_credentials_exit_2(
    token_registry: Registry, isolated: Path, tmp_path: Path, blobs_dir: Path
) -> None:
    _docker_config(isolated, token_registry.host, USER, "nope")
    out = tmp_path / "x.eif"
    result = build(blobs_dir, out, "--image", f"docker://{token_registry.host}/app:v1")
    assert result.exit_code == 2, result.output
    assert "refused the credentials" in result.stderr
    assert not out.exists()
