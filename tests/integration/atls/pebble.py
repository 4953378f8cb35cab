"""Let's Encrypt's Pebble ACME test server (Debian package ``pebble``), started on 127.0.0.1.

Pebble gets its own TLS certificate (made here, for ``localhost``/127.0.0.1), validates http-01
for real against ``http_port`` (``PEBBLE_VA_NOSLEEP=1`` only removes its random delay;
``PEBBLE_VA_ALWAYS_VALID`` is removed from the environment), refuses 5 % of valid nonces with
``badNonce`` as Let's Encrypt may (``nonce_reject`` changes the share), and makes a new root per
start, fetched from its management interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tls_files(tmp: Path) -> Path:
    """A CA and a localhost leaf for Pebble's own listener; returns the CA's PEM path."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / "pebble-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / "pebble-cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "pebble-listener-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return tmp / "pebble-listener-ca.pem"


@dataclass
class Pebble:
    directory: str
    #: PEM of the CA of Pebble's own listener (``--acme-ca-bundle``).
    listener_ca: Path
    #: PEM of the root Pebble issues under (what ``curl --cacert`` / ``atls get --ca-cert`` trust).
    root: Path
    http_port: int


@contextmanager
def run_pebble(tmp: Path, http_port: int, *, nonce_reject: int | None = None) -> Iterator[Pebble]:
    """``nonce_reject``: percentage of valid nonces Pebble refuses with ``badNonce`` (Pebble's
    default, 5, when None)."""
    exe = shutil.which("pebble")
    if exe is None:
        pytest.skip("pebble is not installed (apt-get install -y pebble; .ci/run installs it)")
    listener_ca = _tls_files(tmp)
    acme_port, mgmt_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{mgmt_port}",
            "certificate": str(tmp / "pebble-cert.pem"),
            "privateKey": str(tmp / "pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    (tmp / "pebble-config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    env["PEBBLE_VA_NOSLEEP"] = "1"  # no random validation delay; validation itself stays real
    if nonce_reject is not None:
        env["PEBBLE_WFE_NONCEREJECT"] = str(nonce_reject)
    log = (tmp / "pebble.log").open("wb")
    proc = subprocess.Popen(
        [exe, "-config", str(tmp / "pebble-config.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(listener_ca))
        deadline = time.monotonic() + 20
        root_pem = b""
        while True:
            try:
                with urllib.request.urlopen(
                    f"https://localhost:{mgmt_port}/roots/0", context=ctx, timeout=2
                ) as r:
                    root_pem = r.read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "pebble did not start: " + (tmp / "pebble.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.1)
        (tmp / "pebble-root.pem").write_bytes(root_pem)
        yield Pebble(
            directory=f"https://localhost:{acme_port}/dir",
            listener_ca=listener_ca,
            root=tmp / "pebble-root.pem",
            http_port=http_port,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
