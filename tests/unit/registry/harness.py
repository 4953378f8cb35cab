"""Real registries for the pull tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1,
images pushed with ``skopeo``, a token server, and a proxy that dies mid-transfer.

Every registry binds an ephemeral port (``addr: 127.0.0.1:0``; the port is read from its log), keeps its
storage under the test's temporary folder and is stopped by its own process handle.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.unit.build_enclave.factory import F, config, layer, sha

REGISTRY = "docker-registry"
SKOPEO = "skopeo"


def require_tools() -> None:
    """Skip without docker-registry/skopeo on a developer machine; in CI (.ci/run installs them) fail."""
    missing = [tool for tool in (REGISTRY, SKOPEO) if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing: .ci/run must install them")
        pytest.skip(f"needs {', '.join(missing)} (apt-get install docker-registry skopeo)")


@dataclass
class Registry:
    process: subprocess.Popen[bytes]
    host: str  # 127.0.0.1:PORT
    storage: Path
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(directory: Path, storage: Path, *, extra: str = "") -> Registry:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "config.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        "http:\n  addr: 127.0.0.1:0\n  secret: enclavekit-tests\n" + extra
    )
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [REGISTRY, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if match:
            return Registry(process, match.group(1), storage, log)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"docker-registry did not start: {log.read_text(errors='replace')}")


def skopeo_push(source: str, registry: str, name: str, *, all_images: bool = False) -> None:
    args = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
    if all_images:
        args.append("--all")
    subprocess.run([*args, source, f"docker://{registry}/{name}"], check=True, timeout=120)


def skopeo_export(reference: str, destination: str) -> None:
    subprocess.run(
        [SKOPEO, "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}", destination],
        check=True,
        timeout=120,
    )


# -- test images ---------------------------------------------------------------------------------------


def app_layers(tag: str, payload_size: int = 64 << 10) -> list[bytes]:
    """A base layer and an app layer whose bytes are unique to ``tag`` (blobs are shared in storage)."""
    base = layer(
        F("bin", kind="dir", mode=0o755),
        F("bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755),
        F("etc", kind="dir", mode=0o755),
        F("etc/os-release", f"NAME=test-{tag}\n".encode()),
    )
    payload = hashlib.shake_256(tag.encode()).digest(payload_size)
    app = layer(F("app", kind="dir", mode=0o755), F("app/data.bin", payload))
    return [base, app]


def write_layout(target: Path, images: dict[str, list[bytes]], *, ref: str) -> Path:
    """An OCI layout holding one manifest per architecture in ``images`` (arch → layer tars); with
    several architectures the index's entry is an image index, as ``docker buildx`` pushes."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict[str, Any]:
        blobs[sha(data)] = data
        return {"digest": sha(data), "size": len(data)}

    manifests = []
    for arch, layers in images.items():
        stored = [gzip.compress(x, mtime=0) for x in layers]
        cfg = config([sha(x) for x in layers], arch=arch, cmd=["/bin/hello", arch])
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(cfg)},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(s)}
                    for s in stored
                ],
            }
        ).encode()
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "platform": {
                    "architecture": arch,
                    "os": "linux",
                    **({"variant": "v8"} if arch == "arm64" else {}),
                },
            }
        )
    if len(manifests) == 1:
        entry = manifests[0]
        entry.pop("platform")
    else:
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            }
        ).encode()
        entry = {"mediaType": "application/vnd.oci.image.index.v1+json", **put(index)}
    entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
    files = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.partition(":")[2]] = data
    for name, data in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


def storage_blob(storage: Path, digest: str) -> Path:
    hexdigest = digest.partition(":")[2]
    return storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


# -- TLS and tokens ------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TlsFiles:
    """A test CA and a server certificate for 127.0.0.1 issued by it."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("enclavekit test CA"))
        .issuer_name(_name("enclavekit test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Docker's token protocol: GET /token?service=…&scope=… with basic auth → an ES256 JWT whose
    ``x5c`` certificate is in the registry's ``rootcertbundle``."""

    SERVICE = "enclavekit-test-registry"
    ISSUER = "enclavekit-test-issuer"

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        self.users = users
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("token signer"))
            .issuer_name(_name("token signer"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=2))
            .sign(self.key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.bundle = directory / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[dict[str, list[str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                server.requests.append(query)
                user = server._user(self.headers.get("Authorization", ""))
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                body = json.dumps({"token": server._token(user, scope)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def registry_config(self) -> str:
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n    service: {self.SERVICE}\n    issuer: {self.ISSUER}\n"
            f"    rootcertbundle: {self.bundle}\n"
        )

    def _user(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def _token(self, user: str, scope: str) -> str:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        access = [{"type": kind, "name": name, "actions": actions.split(",")}] if scope else []
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.ISSUER,
            "sub": user,
            "aud": self.SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DyingProxy:
    """A TCP proxy to ``upstream`` that, once ``cut_after`` response bytes went through, drops every
    connection and stops listening: the registry "goes down" mid-pull."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.sent = 0
        self.dead = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent >= self.cut_after
                    if over:
                        self.kill()
                        return
        except OSError:
            pass

    def kill(self) -> None:
        self.dead.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


class GatedProxy(DyingProxy):
    """A TCP proxy to ``upstream`` that, once ``hold_after`` response bytes went through, forwards
    nothing more until :attr:`release` is set: a registry that stalls mid-pull (and then recovers)."""

    def __init__(self, upstream: str, hold_after: int) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        super().__init__(upstream, cut_after=1 << 62)
        self.hold_after = hold_after

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(16384):
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent >= self.hold_after
                    if over and not self.release.is_set():
                        self.holding.set()
                        self.release.wait()
                dst.sendall(data)
        except OSError:
            pass


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


class FlakyFront:
    """An HTTP front for a real registry that answers the first ``fail`` blob GETs with ``status``
    (``Retry-After: 0``) and forwards everything else, to exercise the client's retries."""

    def __init__(self, upstream: str, *, fail: int, status: int = 503) -> None:
        import http.client

        self.failures_left = fail
        self.blob_requests = 0
        self.lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if "/blobs/" in self.path:
                    with front.lock:
                        front.blob_requests += 1
                        failing = front.failures_left > 0
                        front.failures_left -= 1 if failing else 0
                    if failing:
                        self.send_response(status)
                        self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                host, _, port = upstream.rpartition(":")
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                connection.request("GET", self.path, headers=headers)
                answer = connection.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                connection.close()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
