"""Reference parsing (Docker's rules), WWW-Authenticate parsing, Docker config and ECR credentials."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclavekit.eif.registry.auth import (
    docker_credentials,
    ecr_credentials,
    is_ecr_host,
    parse_challenge,
)
from enclavekit.eif.registry.reference import parse_reference
from enclavekit.errors import UsageError

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "familiar"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None, "alpine"),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None, "alpine"),
        ("user/app:v1", "docker.io", "user/app", "v1", None, "user/app"),
        ("docker.io/library/alpine", "docker.io", "library/alpine", "latest", None, "alpine"),
        ("index.docker.io/user/app", "docker.io", "user/app", "latest", None, "user/app"),
        ("localhost/app", "localhost", "app", "latest", None, "localhost/app"),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None, "localhost:5000/a/b"),
        ("127.0.0.1:5000/app:1", "127.0.0.1:5000", "app", "1", None, "127.0.0.1:5000/app"),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/enclave:prod",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "enclave",
            "prod",
            None,
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/enclave",
        ),
        (f"alpine@{D}", "docker.io", "library/alpine", None, D, "alpine"),
        (f"ghcr.io/o/r:t@{D}", "ghcr.io", "o/r", "t", D, "ghcr.io/o/r"),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None, "[::1]:5000/app"),
    ],
)
def test_docker_reference_forms(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, familiar: str
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert ref.familiar_repository == familiar
    assert ref.reference == (digest or tag)


def test_hub_api_host_and_loopback() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/a").is_loopback
    assert parse_reference("localhost/a").is_loopback
    assert parse_reference("[::1]:5000/a").is_loopback
    assert not parse_reference("registry.example:5000/a").is_loopback


@pytest.mark.parametrize(
    "text",
    ["", "Alpine", "alpine:", "alpine@sha256:abc", "a//b", "-a", "a:b:c", " alpine", "a@md5:00"],
)
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


@given(st.text(max_size=80))
def test_parse_reference_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except UsageError:
        return
    assert parse_reference(str(ref)) == ref  # the familiar form parses back to the same reference


def test_challenges() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }
    basic = parse_challenge('Basic realm="x \\"y\\""')
    assert basic is not None and basic.scheme == "basic" and basic.params == {"realm": 'x "y"'}
    assert parse_challenge("") is None


@given(st.text(max_size=200))
def test_parse_challenge_never_crashes(header: str) -> None:
    parse_challenge(header)


def test_docker_config_auths_forms(tmp_path: Path) -> None:
    auth = base64.b64encode(b"u:p:with:colons").decode()
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "http://reg.example:5000/v2/": {"username": "a", "password": "b"},
                }
            }
        )
    )
    env = {"DOCKER_CONFIG": str(tmp_path)}
    hub = docker_credentials("docker.io", env)
    assert hub is not None and (hub.username, hub.password) == ("u", "p:with:colons")
    other = docker_credentials("reg.example:5000", env)
    assert other is not None and (other.username, other.password) == ("a", "b")
    assert docker_credentials("reg.example", env) is None
    assert "p:with" not in repr(hub)


def test_missing_credential_helper_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "enclavekit-absent-helper"}))
    with pytest.raises(UsageError, match="not on PATH"):
        docker_credentials("reg.example", {"DOCKER_CONFIG": str(tmp_path)})


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_ecr_credentials_through_botocore_against_moto(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_ECR", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    assert is_ecr_host(host)
    assert not is_ecr_host("ecr.example.com")
    creds = ecr_credentials(host)
    assert creds.username == "AWS"
    assert creds.password
    assert creds.source == "Amazon ECR GetAuthorizationToken"
