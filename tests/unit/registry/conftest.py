"""Session fixtures: one registry storage, pushed once with skopeo, served by plain-HTTP, TLS,
htpasswd and token-auth registries (see :mod:`tests.unit.registry.harness`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from tests.unit.build_enclave.conftest import blobs_dir
from tests.unit.registry.harness import (
    Registry,
    TlsFiles,
    TokenServer,
    app_layers,
    make_tls,
    require_tools,
    skopeo_push,
    start_registry,
    write_layout,
)

__all__ = ["blobs_dir"]

USER, PASSWORD = "puller", "s3cret-pull"


@dataclass
class Pushed:
    registry: Registry
    layouts: dict[str, Path]  # name:tag → the OCI layout it was pushed from


@pytest.fixture(scope="session")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    require_tools()
    root = tmp_path_factory.mktemp("registry")
    registry = start_registry(root / "plain", root / "storage")
    images = {
        "app:v1": {"amd64": app_layers("app")},
        "multi:1": {"amd64": app_layers("multi-amd64"), "arm64": app_layers("multi-arm64")},
        "corrupt-layer:1": {"amd64": app_layers("corrupt-layer")},
        "corrupt-manifest:1": {"amd64": app_layers("corrupt-manifest")},
        "big:1": {"amd64": app_layers("big", payload_size=6 << 20)},
    }
    layouts = {}
    try:
        for name, arches in images.items():
            layout = write_layout(root / "layouts" / name.replace(":", "-"), arches, ref="src")
            skopeo_push(f"oci:{layout}:src", registry.host, name, all_images=len(arches) > 1)
            layouts[name] = layout
        yield Pushed(registry, layouts)
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_registry(
    pushed: Pushed, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    registry = start_registry(
        tmp_path_factory.mktemp("tls-registry"),
        pushed.registry.storage,
        extra=f"  tls:\n    certificate: {tls_files.cert}\n    key: {tls_files.key}\n",
    )
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def htpasswd_registry(
    pushed: Pushed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("htpasswd-registry")
    users = directory / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    users.write_text(f"{USER}:{hashed}\n")
    registry = start_registry(
        directory,
        pushed.registry.storage,
        extra=f"auth:\n  htpasswd:\n    realm: enclavekit-tests\n    path: {users}\n",
    )
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("token"), {USER: PASSWORD})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(
    pushed: Pushed, token_server: TokenServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    registry = start_registry(
        tmp_path_factory.mktemp("token-registry"),
        pushed.registry.storage,
        extra=token_server.registry_config(),
    )
    yield registry
    registry.stop()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh blob cache and an empty Docker config for each test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return docker_config
