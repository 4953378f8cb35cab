"""End to end on loopback: emulated NSM → CA → enclave proxy → upstream; curl and the attested client."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import socket
import ssl
import subprocess
from datetime import timedelta

import httpx
import pytest
from cryptography import x509

from enclavekit.atls.ca import CLOCK_SKEW
from enclavekit.atls.client import AttestedClient, load_ca_root
from enclavekit.atls.extension import document_from_certificate
from enclavekit.attestation.policy import PcrsEqual
from enclavekit.errors import PolicyViolation, VerificationError
from tests.integration.atls.atls_loop import PCRS, UPSTREAM_BODY, Loop


def _client(loop: Loop, **kw: object) -> AttestedClient:
    return AttestedClient(
        load_ca_root(loop.ca_root_path.read_bytes()),
        verifier=loop.verifier(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_with_cacert_gets_the_upstream_answer(loop: Loop) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(loop.ca_root_path), loop.url],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == UPSTREAM_BODY
    assert loop.upstream_requests == ["/"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_without_the_ca_root_refuses(loop: Loop) -> None:
    """A client that does not trust the attestation CA gets no connection."""
    out = subprocess.run(["curl", "-sS", loop.url], capture_output=True, timeout=30)
    assert out.returncode != 0
    assert loop.upstream_requests == []


def test_httpx_with_ca_root_works(loop: Loop) -> None:
    ctx = ssl.create_default_context(cafile=str(loop.ca_root_path))
    r = httpx.get(loop.url, verify=ctx)
    assert r.content == UPSTREAM_BODY


def test_attested_client_verifies_policy_and_fresh_document(loop: Loop) -> None:
    client = _client(loop, policy=PcrsEqual(PCRS), fresh=True)
    peer, response = client.request("GET", loop.url + "x")
    assert response.content == UPSTREAM_BODY
    assert peer.fresh is not None
    assert peer.embedded.pcrs[0] == PCRS[0]
    assert loop.upstream_requests == ["/x"]


def test_wrong_pcr_policy_refuses_before_sending(loop: Loop) -> None:
    """A client whose policy does not match the enclave sends no request byte upstream."""
    client = _client(loop, policy=PcrsEqual({0: b"\x99" * 48}))
    with pytest.raises(PolicyViolation, match="PCR0"):
        client.request("GET", loop.url)
    assert loop.upstream_requests == []


def test_foreign_nsm_root_refuses_before_sending(loop: Loop) -> None:
    """Documents from an NSM PKI the client does not pin are refused (AWS root only by default)."""
    client = AttestedClient(load_ca_root(loop.ca_root_path.read_bytes()))
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        client.request("GET", loop.url)
    assert loop.upstream_requests == []


def test_embedded_document_binds_the_serving_key(loop: Loop) -> None:
    cert = loop.identity.current.certificate
    doc = document_from_certificate(cert)
    at = cert.not_valid_before_utc + CLOCK_SKEW
    verified = loop.verifier().verify(doc, PcrsEqual(PCRS), at=at)
    assert verified.public_key == loop.identity.current.public_key_der


def test_well_known_attestation_endpoint(loop: Loop) -> None:
    nonce = secrets.token_bytes(32)
    ctx = ssl.create_default_context(cafile=str(loop.ca_root_path))
    r = httpx.get(
        loop.url.rstrip("/") + f"/.well-known/attestation?nonce={nonce.hex()}", verify=ctx
    )
    assert r.status_code == 200
    body = r.json()
    assert body["nonce"] == nonce.hex()
    assert loop.upstream_requests == []
    base = loop.url.rstrip("/") + "/.well-known/attestation"
    for query in ("?nonce=zz", "?nonce=" + "00" * 8, "?nonce=" + "00" * 65, "", "?x=1"):
        assert httpx.get(base + query, verify=ctx).status_code == 400, query
    assert loop.upstream_requests == []
    assert httpx.get(base + "-other", verify=ctx).content == UPSTREAM_BODY
    assert loop.upstream_requests == ["/.well-known/attestation-other"]


def test_renewal_installs_a_new_certificate(loop: Loop) -> None:
    old = loop.identity.current.certificate
    loop.identity.obtain()
    new = loop.identity.current.certificate
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()
    client = _client(loop, policy=PcrsEqual(PCRS))
    peer, response = client.request("GET", loop.url)
    assert peer.certificate == new
    assert response.status_code == 200


def test_non_http_bytes_are_relayed(loop: Loop) -> None:
    ctx = ssl.create_default_context(cafile=str(loop.ca_root_path))
    with (
        socket.create_connection(("127.0.0.1", loop.proxy.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /raw HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    assert data.endswith(UPSTREAM_BODY)
    assert loop.upstream_requests == ["/raw"]


def test_issuance_is_recorded(loop: Loop) -> None:
    serial = loop.identity.current.certificate.serial_number
    rec = httpx.get(f"{loop.ca.url}/v1/certificates/{serial:x}").json()
    assert rec["service"] == "web"
    cert = x509.load_pem_x509_certificate(rec["certificate"].encode())
    assert cert == loop.identity.current.certificate
    assert json.dumps(rec)


def test_replayed_fresh_document_is_refused(loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server answering the fresh challenge with a document for another nonce is refused."""
    honest = loop.identity.attestation_for
    monkeypatch.setattr(loop.identity, "attestation_for", lambda nonce: honest(b"\x00" * 32))
    client = _client(loop, policy=PcrsEqual(PCRS), fresh=True)
    with pytest.raises(PolicyViolation, match="nonce"):
        client.request("GET", loop.url)
    assert loop.upstream_requests == []


def test_certificate_from_another_ca_is_refused(loop: Loop) -> None:
    """A client pinned to a different attestation CA refuses the server before sending."""
    from enclavekit.atls.ca import create_ca_keys

    other = create_ca_keys(now=loop.identity.current.certificate.not_valid_before_utc)
    client = AttestedClient(other.root, verifier=loop.verifier())
    with pytest.raises(VerificationError, match="does not chain to the attestation CA root"):
        client.request("GET", loop.url)
    assert loop.upstream_requests == []


def test_httpx_client_helper(loop: Loop) -> None:
    with _client(loop, policy=PcrsEqual(PCRS)).httpx_client(loop.url) as http:
        assert http.get("/helper").content == UPSTREAM_BODY
    assert loop.upstream_requests == ["/helper"]


def test_renewal_is_due_after_two_thirds_of_the_lifetime(loop: Loop) -> None:
    from enclavekit.atls.server import EnclaveIdentity
    from enclavekit.nsm import Nsm

    now = [loop.identity.current.certificate.not_valid_before_utc]
    identity = EnclaveIdentity(
        loop.identity.ca, "web", Nsm.in_process(loop.emulator), clock=lambda: now[0]
    )
    assert identity.renew_if_due()  # no certificate yet
    first = identity.current.certificate
    start, end = now[0], first.not_valid_after_utc
    now[0] = start + (end - start) * 2 / 3 - timedelta(seconds=1)
    assert not identity.renew_if_due()
    now[0] += timedelta(seconds=1)
    assert identity.renew_if_due()
    assert identity.current.certificate.serial_number != first.serial_number


def test_background_renewal_of_short_lived_certificates(loop: Loop) -> None:
    """With 3 s certificates the renewal thread replaces the certificate before it expires."""
    import time

    from enclavekit.atls.ca import CaPolicy, ServicePolicy
    from enclavekit.atls.server import EnclaveIdentity
    from enclavekit.nsm import Nsm

    svc = ServicePolicy("short", ("localhost",), (dict(PCRS),), validity=timedelta(seconds=3))
    loop.issuer.policy = CaPolicy({"short": svc})
    identity = EnclaveIdentity(loop.identity.ca, "short", Nsm.in_process(loop.emulator))
    identity.obtain()
    first = identity.current.certificate
    identity.start_renewal(poll=0.2)
    try:
        deadline = time.monotonic() + 10
        while identity.current.certificate == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert identity.current.certificate != first
        renewed = identity.current.certificate
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        time.sleep(0.5)
        assert identity.current.certificate == renewed  # not renewing in a loop
    finally:
        identity.stop()


def test_revoked_certificate_is_refused_with_a_crl(loop: Loop) -> None:
    """A client given the CA's CRL refuses a revoked server certificate before sending."""
    from enclavekit.atls.client import load_crl

    loop.identity.obtain()  # a certificate of its own, so other tests are not affected
    serial = loop.identity.current.certificate.serial_number
    crl_before = load_crl(httpx.get(f"{loop.ca.url}/v1/crl").content)
    _client(loop, crl=crl_before).request("GET", loop.url)
    loop.issuer.revoke(serial, "key_compromise")
    crl = load_crl(httpx.get(f"{loop.ca.url}/v1/crl").content)
    with pytest.raises(VerificationError, match="revoked"):
        _client(loop, crl=crl).request("GET", loop.url)
    assert loop.upstream_requests == ["/"]
    loop.identity.obtain()


def test_crl_from_another_ca_or_expired_is_refused(loop: Loop) -> None:
    from datetime import UTC, datetime

    from enclavekit.atls.ca import create_ca_keys
    from enclavekit.atls.client import check_crl, load_crl

    crl = load_crl(httpx.get(f"{loop.ca.url}/v1/crl").content)
    other = create_ca_keys(now=datetime.now(UTC))
    with pytest.raises(VerificationError, match="not signed"):
        check_crl(crl, other.root, datetime.now(UTC))
    assert crl.next_update_utc is not None
    with pytest.raises(VerificationError, match="expired"):
        check_crl(crl, loop.issuer.keys.root, crl.next_update_utc + timedelta(seconds=1))
    check_crl(crl, loop.issuer.keys.root, crl.next_update_utc)


#: The domain-separation label of /.well-known/attestation documents (a test vector: the format
#: is a protocol constant, so the test spells it out rather than importing it).
WELL_KNOWN_CONTEXT = b"enclavekit/atls/v1/fresh-attestation\x00"


def test_attack_well_known_document_answers_another_protocols_challenge(loop: Loop) -> None:
    """The proxy signs a document for any nonce the network sends. Its user_data starts with a
    fixed context label, then SHA-256(certificate), then the nonce, so the document cannot pass
    as the answer to another protocol's challenge (whose user_data would not carry the label)."""
    nonce = secrets.token_bytes(32)
    ctx = ssl.create_default_context(cafile=str(loop.ca_root_path))
    r = httpx.get(
        loop.url.rstrip("/") + f"/.well-known/attestation?nonce={nonce.hex()}", verify=ctx
    )
    assert r.status_code == 200
    document = base64.b64decode(r.json()["document"])
    verified = loop.verifier().verify(document, PcrsEqual(PCRS))
    cert_der = loop.identity.current.certificate_der
    assert verified.user_data == WELL_KNOWN_CONTEXT + hashlib.sha256(cert_der).digest() + nonce
    assert verified.nonce == nonce


def test_attack_unlabelled_fresh_document_is_accepted(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server answering the fresh challenge with a document whose user_data lacks the context
    label (SHA-256(cert) ‖ nonce, as before the label) is refused by the client."""
    identity = loop.identity

    def unlabelled(nonce: bytes) -> dict[str, str]:
        current = identity.current
        document = identity.nsm.attestation(
            user_data=hashlib.sha256(current.certificate_der).digest() + nonce,
            nonce=nonce,
            public_key=current.public_key_der,
        )
        return {"document": base64.b64encode(document).decode(), "nonce": nonce.hex()}

    monkeypatch.setattr(identity, "attestation_for", unlabelled)
    client = _client(loop, policy=PcrsEqual(PCRS), fresh=True)
    with pytest.raises(PolicyViolation, match="user_data"):
        client.request("GET", loop.url)
    assert loop.upstream_requests == []
