"""TLS for the attestation CA's own HTTP API (``ca serve --tls``).

The CA issues itself a server certificate from its own root at every start: a fresh P-384 key that
lives only in memory (handed to uvicorn through an anonymous ``memfd``, like the proxy's key), the
SANs from ``--tls-name`` (DNS names or IP addresses), valid for :data:`CA_TLS_VALIDITY` (a CA that
runs longer must be restarted — the key and certificate are re-made on every start). Clients trust
the CA root (``ca root``) for it, the same root that anchors the attested certificates.

Not done: the TLS certificate carries no attestation document (the CA is not an enclave) and is not
recorded in the CA's store or CRL (it is never revoked; it dies with the process).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from enclavekit.atls.ca import CaKeys, end_entity_builder
from enclavekit.errors import UsageError

#: Lifetime of the CA's own TLS certificate (re-made at every start).
CA_TLS_VALIDITY = timedelta(days=365)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    label_ok = all(
        part and len(part) <= 63 and all(c.isalnum() or c in "-*" for c in part)
        for part in name.split(".")
    )
    if not name or len(name) > 253 or not label_ok:
        raise UsageError(f"--tls-name: expected a DNS name or IP address, found {name[:80]!r}")
    return x509.DNSName(name)


def issue_ca_tls_certificate(
    keys: CaKeys, names: Sequence[str], *, now: datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and a serverAuth certificate for ``names``, signed by the CA root."""
    if not names:
        raise UsageError("--tls needs at least one --tls-name (the host name clients connect to)")
    sans = [_san(n) for n in names]
    key = ec.generate_private_key(ec.SECP384R1())
    not_after = min(now + CA_TLS_VALIDITY, keys.root.not_valid_after_utc)
    cert = end_entity_builder(
        keys,
        names[0][:64],
        key.public_key(),
        now=now,
        not_after=not_after,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    ).sign(keys.key, hashes.SHA384())
    return key, cert


@contextlib.contextmanager
def in_memory_pem_files(
    key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]
) -> Iterator[tuple[str, str]]:
    """``(keyfile, certfile)`` paths for APIs that load TLS identities only from paths (uvicorn).

    Both are anonymous ``memfd`` descriptors (``/proc/self/fd/N``), closed when the block ends:
    the key never reaches a file system.
    """
    if not hasattr(os, "memfd_create"):  # pragma: no cover - non-Linux development machines
        raise UsageError("--tls needs Linux (memfd_create) to keep the TLS key off the disk")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    fds: list[int] = []
    try:
        for name, data in (
            ("enclavekit-ca-tls-key", key_pem),
            ("enclavekit-ca-tls-cert", cert_pem),
        ):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)


def ca_client_context(ca_root: x509.Certificate | None) -> ssl.SSLContext:
    """The client context for an ``https://`` CA URL: trust ``ca_root`` only, else the system store."""
    if ca_root is None:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca_root.public_bytes(serialization.Encoding.PEM).decode())
    return ctx


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost`` (the only places plain HTTP is allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
