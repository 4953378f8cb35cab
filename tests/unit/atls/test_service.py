"""The CA HTTP API: challenges, issuance, refusals as 400/403 with every failure, lookup, CRL."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509

from enclavekit.atls.ca import CaKeys, Issuer, NitroEvidenceVerifier
from enclavekit.atls.service import create_app, start_in_thread
from enclavekit.atls.store import Store
from tests.unit.atls.atls_support import (
    DEBUG_PCRS,
    Clock,
    DocumentFactory,
    ca_policy,
    make_csr,
    spki,
)

TOKEN = "t0ken"


@pytest.fixture
def client(issuer: Issuer) -> Iterator[httpx.Client]:
    running = start_in_thread(create_app(issuer, admin_token=TOKEN))
    with httpx.Client(base_url=running.url) as c:
        yield c
    running.stop()


def _request(client: httpx.Client, factory: DocumentFactory, **kw: object) -> dict[str, str]:
    csr, key = make_csr()
    nonce = bytes.fromhex(client.post("/v1/challenges").json()["nonce"])
    args: dict[str, object] = {"public_key": spki(key), "nonce": nonce}
    args.update(kw)
    doc = factory.make(**args)  # type: ignore[arg-type]
    return {
        "service": "web",
        "csr": csr.decode(),
        "attestation_document": base64.b64encode(doc).decode(),
    }


def test_challenge_then_certificate(client: httpx.Client, factory: DocumentFactory) -> None:
    r = client.post("/v1/challenges")
    assert r.status_code == 201
    assert len(bytes.fromhex(r.json()["nonce"])) == 32
    r = client.post("/v1/certificates", json=_request(client, factory))
    assert r.status_code == 201, r.text
    body = r.json()
    certs = x509.load_pem_x509_certificates(body["chain"].encode())
    assert len(certs) == 2
    got = client.get(f"/v1/certificates/{body['serial']}")
    assert got.status_code == 200
    assert got.json()["revoked"] is False
    assert got.json()["certificate"] == body["certificate"]


def test_replay_is_403(client: httpx.Client, factory: DocumentFactory) -> None:
    """The same request twice: the second is refused."""
    req = _request(client, factory)
    assert client.post("/v1/certificates", json=req).status_code == 201
    r = client.post("/v1/certificates", json=req)
    assert r.status_code == 403
    assert "already used" in r.json()["detail"]


def test_policy_refusal_lists_every_failure(client: httpx.Client, factory: DocumentFactory) -> None:
    r = client.post("/v1/certificates", json=_request(client, factory, pcrs=DEBUG_PCRS))
    assert r.status_code == 403
    checks = [f["check"] for f in r.json()["failures"]]
    assert "debug" in checks
    assert "pcrs[0].PCR0" in checks


@pytest.mark.parametrize(
    "patch",
    [
        {"attestation_document": "***"},
        {"csr": "garbage"},
        {"attestation_document": base64.b64encode(b"\xa0").decode()},
    ],
)
def test_malformed_input_is_400(
    client: httpx.Client, factory: DocumentFactory, patch: dict[str, str]
) -> None:
    req = _request(client, factory) | patch
    assert client.post("/v1/certificates", json=req).status_code == 400


def test_oversized_fields_are_refused(client: httpx.Client, factory: DocumentFactory) -> None:
    """Oversized fields (422) and bodies (413) are refused before any parsing of their content."""
    req = _request(client, factory) | {"attestation_document": "A" * 100_000}
    assert client.post("/v1/certificates", json=req).status_code == 422
    req = _request(client, factory) | {"attestation_document": "A" * 200_000}
    assert client.post("/v1/certificates", json=req).status_code == 413


def test_revocation_needs_admin_token(client: httpx.Client, factory: DocumentFactory) -> None:
    serial = client.post("/v1/certificates", json=_request(client, factory)).json()["serial"]
    url = f"/v1/certificates/{serial}/revoke"
    assert client.post(url, json={}).status_code == 403
    assert client.post(url, json={}, headers={"Authorization": "Bearer nope"}).status_code == 403
    r = client.post(
        url, json={"reason": "superseded"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 200
    assert client.get(f"/v1/certificates/{serial}").json()["revoked"] is True
    crl = x509.load_der_x509_crl(client.get("/v1/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_revocation_disabled_without_token(issuer: Issuer) -> None:
    running = start_in_thread(create_app(issuer, admin_token=None))
    try:
        r = httpx.post(
            running.url + "/v1/certificates/ab/revoke",
            json={},
            headers={"Authorization": "Bearer x"},
        )
    finally:
        running.stop()
    assert r.status_code == 403


def test_unknown_and_bad_serials(client: httpx.Client) -> None:
    assert client.get("/v1/certificates/abc").status_code == 404
    assert client.get("/v1/certificates/xyz").status_code == 400
    assert client.get("/v1/certificates/" + "1" * 41).status_code == 400


def test_openapi_and_root(client: httpx.Client, issuer: Issuer) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/certificates" in spec["paths"]
    assert "/v1/challenges" in spec["paths"]
    assert client.get("/v1/root").content == issuer.keys.root_pem
    assert client.get("/healthz").json() == {"status": "ok"}


def test_audit_log_records_issuance_and_refusal(
    client: httpx.Client, factory: DocumentFactory
) -> None:
    """Every issuance and refusal is in the audit log, which needs the admin token."""
    req = _request(client, factory)
    serial = client.post("/v1/certificates", json=req).json()["serial"]
    client.post("/v1/certificates", json=req)  # replay: refused
    assert client.get("/v1/events").status_code == 403
    events = client.get("/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}).json()["events"]
    assert [e["kind"] for e in events] == ["refused", "issued"]
    assert events[1]["serial"] == serial
    assert "already used" in events[0]["detail"]


def test_an_issuance_runs_on_the_loop_with_a_local_store_and_on_threads_with_a_server(
    ca_keys: CaKeys, factory: DocumentFactory, clock: Clock, any_store: Store
) -> None:
    """SQLite: on the event loop (a busy worker then leaves new connections to idle ones);
    PostgreSQL: on the issuer's threads, so that the database's round trips overlap."""
    issuer = Issuer(
        ca_keys, ca_policy(), any_store, NitroEvidenceVerifier(factory.verifier()), clock=clock
    )
    threads: list[str] = []
    issuer.add_observer(lambda _outcome: threads.append(threading.current_thread().name))
    running = start_in_thread(create_app(issuer))
    try:
        with httpx.Client(base_url=running.url) as c:
            r = c.post("/v1/certificates", json=_request(c, factory))
            assert r.status_code == 201, r.text
            assert r.headers["content-type"] == "application/json"
            assert set(r.json()) >= {"serial", "certificate", "chain", "not_after"}
    finally:
        running.stop()
    [name] = threads
    assert name.startswith("issuer") is any_store.over_network
