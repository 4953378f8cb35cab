"""Issuance logic: the happy path and every refusal, with an injected clock and a test PKI."""

from __future__ import annotations

import contextlib
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.atls.ca import (
    CaKeys,
    Issuer,
    NitroEvidenceVerifier,
    ca_policy_from_mapping,
    init_state_dir,
    load_ca_keys,
    load_ca_policy,
    parse_csr,
)
from enclavekit.atls.extension import document_from_certificate
from enclavekit.atls.store import SqliteStore
from enclavekit.errors import MalformedInput, PolicyViolation, UsageError, VerificationError
from tests.unit.atls.atls_support import (
    DEBUG_PCRS,
    PCRS,
    Clock,
    DocumentFactory,
    ca_policy,
    make_csr,
    spki,
)


def _attest(issuer: Issuer, factory: DocumentFactory, **kw: object) -> tuple[bytes, bytes]:
    csr, key = make_csr()
    nonce = issuer.new_challenge().nonce
    args: dict[str, object] = {"public_key": spki(key), "nonce": nonce}
    args.update(kw)
    return csr, factory.make(**args)  # type: ignore[arg-type]


def test_issues_short_lived_certificate_chained_to_root(
    issuer: Issuer, factory: DocumentFactory, clock: Clock
) -> None:
    csr, doc = _attest(issuer, factory)
    issued = issuer.issue("web", csr, doc)
    cert = issued.certificate
    assert cert.issuer == issuer.keys.root.subject
    cert.verify_directly_issued_by(issuer.keys.root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.enclave.test", "localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.not_valid_after_utc - clock() == timedelta(hours=1)
    assert document_from_certificate(cert) == doc
    assert issuer.get(cert.serial_number) == issued.record
    assert issuer.store.events(1)[0].kind == "issued"


def test_replayed_challenge_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A document (and nonce) used once cannot obtain a second certificate."""
    csr, doc = _attest(issuer, factory)
    issuer.issue("web", csr, doc)
    with pytest.raises(VerificationError, match="already used"):
        issuer.issue("web", csr, doc)
    assert issuer.store.events(1)[0].kind == "refused"


def test_unknown_nonce_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A nonce the CA never handed out is refused."""
    csr, key = make_csr()
    doc = factory.make(public_key=spki(key), nonce=b"\x01" * 32)
    with pytest.raises(VerificationError, match="unknown"):
        issuer.issue("web", csr, doc)


def test_missing_nonce_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A document without a nonce (no challenge) is refused."""
    csr, key = make_csr()
    with pytest.raises(VerificationError, match="no nonce"):
        issuer.issue("web", csr, factory.make(public_key=spki(key)))


def test_expired_challenge_is_refused(
    issuer: Issuer, factory: DocumentFactory, clock: Clock
) -> None:
    """A challenge used after its expiry is refused (±1 s around the 60 s TTL)."""
    csr, doc = _attest(issuer, factory)
    clock.advance(seconds=60)
    with pytest.raises(VerificationError, match="expired"):
        issuer.issue("web", csr, doc)
    clock.advance(seconds=-61)
    csr, doc = _attest(issuer, factory)
    clock.advance(seconds=59)
    issuer.issue("web", csr, doc)


def test_mismatched_key_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A CSR for a key other than the attested public_key is refused."""
    csr, _ = make_csr()
    _, other = make_csr()
    doc = factory.make(public_key=spki(other), nonce=issuer.new_challenge().nonce)
    with pytest.raises(PolicyViolation) as err:
        issuer.issue("web", csr, doc)
    assert [f.check for f in err.value.failures] == ["public_key"]


def test_debug_enclave_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A debug-mode enclave (PCR0-2 zero) is refused, and its PCR mismatch reported too."""
    csr, doc = _attest(issuer, factory, pcrs=DEBUG_PCRS)
    with pytest.raises(PolicyViolation) as err:
        issuer.issue("web", csr, doc)
    checks = [f.check for f in err.value.failures]
    assert checks[0] == "debug"
    assert "pcrs[0].PCR0" in checks


def test_debug_enclave_allowed_only_with_unsafe_switch(
    ca_keys: CaKeys, store: SqliteStore, factory: DocumentFactory, clock: Clock
) -> None:
    policy = ca_policy(unsafe_allow_debug=True)
    svc = policy.services["web"]
    policy = type(policy)(
        services={
            "web": type(svc)("web", svc.dns_names, ({0: bytes(48)},), unsafe_allow_debug=True)
        }
    )
    issuer = Issuer(ca_keys, policy, store, NitroEvidenceVerifier(factory.verifier()), clock=clock)
    csr, doc = _attest(issuer, factory, pcrs=DEBUG_PCRS)
    issuer.issue("web", csr, doc)


def test_wrong_pcrs_are_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """An enclave whose PCR2 is not on the allowlist gets no certificate."""
    csr, doc = _attest(issuer, factory, pcrs=PCRS | {2: b"\x09" * 48})
    with pytest.raises(PolicyViolation, match="PCR2"):
        issuer.issue("web", csr, doc)


def test_unknown_service_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A certificate for a service not in the policy is refused."""
    csr, doc = _attest(issuer, factory)
    with pytest.raises(PolicyViolation, match="service"):
        issuer.issue("admin", csr, doc)


def test_expired_document_is_refused(
    issuer: Issuer, factory: DocumentFactory, clock: Clock
) -> None:
    """A document whose NSM certificate has expired is refused (chain validity). Its challenge has
    expired too and is checked first (the cheap check); the verifier refuses the chain itself."""
    csr, doc = _attest(issuer, factory)
    clock.advance(hours=3, seconds=1)
    with pytest.raises(VerificationError, match="expired"):
        issuer.issue("web", csr, doc)
    with pytest.raises(VerificationError, match="chain"):
        issuer.verifier.verify(doc, at=clock())


def test_stale_document_is_refused(issuer: Issuer, factory: DocumentFactory, clock: Clock) -> None:
    """A document created more than 5 minutes before issuance is refused even with a live nonce."""
    csr, doc = _attest(issuer, factory, timestamp=clock() - timedelta(minutes=5, seconds=1))
    with pytest.raises(PolicyViolation, match="max age"):
        issuer.issue("web", csr, doc)


def test_foreign_root_is_refused(issuer: Issuer) -> None:
    """A document from a PKI the CA does not trust is refused."""
    foreign = DocumentFactory(name="foreign root")
    csr, doc = _attest(issuer, foreign)
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        issuer.issue("web", csr, doc)


def test_forged_csr_signature_is_refused(issuer: Issuer, factory: DocumentFactory) -> None:
    """A CSR whose self-signature does not verify (no proof of possession) is refused."""
    csr, doc = _attest(issuer, factory)
    der = x509.load_pem_x509_csr(csr).public_bytes(Encoding.DER)
    tampered = der[:-3] + bytes([der[-3] ^ 1]) + der[-2:]
    with pytest.raises((VerificationError, MalformedInput)):
        issuer.issue("web", tampered, doc)


@pytest.mark.parametrize(
    "csr", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\n", b"\x30" * 20000]
)
def test_malformed_csr_is_refused(issuer: Issuer, factory: DocumentFactory, csr: bytes) -> None:
    _, doc = _attest(issuer, factory)
    with pytest.raises(MalformedInput):
        issuer.issue("web", csr, doc)


def test_malformed_document_is_refused(issuer: Issuer) -> None:
    csr, _ = make_csr()
    with pytest.raises(MalformedInput):
        issuer.issue("web", csr, b"\xa0")


def test_concurrent_issuance_on_one_challenge_issues_at_most_one(
    issuer: Issuer, factory: DocumentFactory
) -> None:
    """Racing requests with the same challenge: exactly one certificate."""
    csr, doc = _attest(issuer, factory)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            issuer.issue("web", csr, doc)
            results.append("ok")
        except VerificationError:
            results.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7


def test_revocation_and_crl(issuer: Issuer, factory: DocumentFactory) -> None:
    csr, doc = _attest(issuer, factory)
    serial = issuer.issue("web", csr, doc).certificate.serial_number
    assert issuer.revoke(serial, "key_compromise")
    assert not issuer.revoke(serial)
    crl = issuer.crl()
    assert crl.is_signature_valid(issuer.keys.root.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    with pytest.raises(UsageError):
        issuer.revoke(serial, "because")


def test_restart_keeps_certificates_and_consumed_nonces(
    tmp_path: Path, factory: DocumentFactory, clock: Clock
) -> None:
    """A CA restarted on the same state refuses a replay and still knows issued certificates."""
    state = tmp_path / "state"
    keys = init_state_dir(state, clock=clock)
    store = SqliteStore(state / "ca.sqlite3")
    issuer = Issuer(
        keys, ca_policy(), store, NitroEvidenceVerifier(factory.verifier()), clock=clock
    )
    csr, doc = _attest(issuer, factory)
    serial = issuer.issue("web", csr, doc).certificate.serial_number
    store.close()

    keys2 = load_ca_keys(state)
    assert keys2.root == keys.root
    store2 = SqliteStore(state / "ca.sqlite3")
    issuer2 = Issuer(
        keys2, ca_policy(), store2, NitroEvidenceVerifier(factory.verifier()), clock=clock
    )
    assert issuer2.get(serial) is not None
    with pytest.raises(VerificationError, match="already used"):
        issuer2.issue("web", csr, doc)
    store2.close()


def test_init_refuses_to_overwrite(tmp_path: Path, clock: Clock) -> None:
    init_state_dir(tmp_path, clock=clock)
    with pytest.raises(UsageError, match="refusing"):
        init_state_dir(tmp_path, clock=clock)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_missing_state_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="ca init"):
        load_ca_keys(tmp_path)


def test_policy_file_yaml_and_measurements(tmp_path: Path) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(
        "challenge_ttl_seconds: 30\n"
        "services:\n"
        "  web:\n"
        "    dns_names: [web.test]\n"
        "    certificate_validity_seconds: 600\n"
        "    pcrs:\n"
        f"      - {{PCR0: '{'ab' * 48}', '1': '{'cd' * 48}'}}\n"
    )
    policy = load_ca_policy(p)
    svc = policy.services["web"]
    assert policy.challenge_ttl == timedelta(seconds=30)
    assert svc.validity == timedelta(seconds=600)
    assert svc.pcr_allowlist == ({0: b"\xab" * 48, 1: b"\xcd" * 48},)
    nitro = ca_policy_from_mapping(
        {
            "services": {
                "a": {
                    "dns_names": ["a"],
                    "pcrs": {
                        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "00" * 48}
                    },
                }
            }
        }
    )
    assert nitro.services["a"].pcr_allowlist == ({0: bytes(48)},)
    listed = ca_policy_from_mapping(
        {"services": {"a": {"dns_names": ["a"], "pcrs": [{"Measurements": {"PCR1": "11" * 48}}]}}}
    )
    assert listed.services["a"].pcr_allowlist == ({1: b"\x11" * 48},)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        {},
        {"services": {}},
        {"services": {"a": {"dns_names": ["a"], "pcrs": []}}},
        {"services": {"a": {"dns_names": [], "pcrs": [{"0": "00" * 48}]}}},
        {"services": {"a": {"dns_names": ["a"], "pcrs": [{"0": "zz"}]}}},
        {"services": {"a": {"dns_names": ["a"], "pcrs": [{"99": "00" * 48}]}}},
        {
            "services": {
                "a": {
                    "dns_names": ["a"],
                    "pcrs": [{"0": "00" * 48}],
                    "certificate_validity_seconds": 10**9,
                }
            }
        },
        {"services": {"a": "x"}},
        {"services": {"a": {"dns_names": ["a"], "pcr": [{"0": "00" * 48}]}}},
        {"services": {"a": {"dns_names": ["a"], "pcrs": [{"0": "00" * 48}]}}, "extra": 1},
        {
            "services": {
                "a": {"dns_names": ["a"], "pcrs": [{"0": "00" * 48}], "unsafe_allow_debug": "no"}
            }
        },
        {
            "services": {
                "a": {"dns_names": ["a"], "pcrs": [{"0": "00" * 48}], "ip_addresses": ["1.2.3"]}
            }
        },
    ],
)
def test_bad_policy_is_refused(obj: object) -> None:
    """Empty allowlists, typos and malformed entries are refused: a weakened policy is a bug."""
    with pytest.raises(UsageError):
        ca_policy_from_mapping(obj)


@pytest.mark.postgres
def test_two_ca_replicas_on_postgres_issue_at_most_one_per_challenge(
    ca_keys: CaKeys, factory: DocumentFactory, clock: Clock
) -> None:
    """Two CA replicas sharing PostgreSQL race on one challenge: one certificate in total."""
    import uuid

    from enclavekit.atls.store import PostgresStore
    from tests.unit.atls.test_store import PG_URL, _pg_available

    if not _pg_available():
        pytest.skip("PostgreSQL not reachable at 127.0.0.1:5432")
    schema = f"ekt_{uuid.uuid4().hex[:12]}"
    stores = [PostgresStore(PG_URL, schema=schema) for _ in range(2)]
    try:
        replicas = [
            Issuer(ca_keys, ca_policy(), s, NitroEvidenceVerifier(factory.verifier()), clock=clock)
            for s in stores
        ]
        csr, doc = _attest(replicas[0], factory)
        results: list[str] = []
        barrier = threading.Barrier(6)

        def attempt(replica: Issuer) -> None:
            barrier.wait()
            try:
                replica.issue("web", csr, doc)
                results.append("ok")
            except VerificationError:
                results.append("refused")

        threads = [threading.Thread(target=attempt, args=(replicas[i % 2],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count("ok") == 1
        kinds = [e.kind for e in stores[1].events()]
        assert kinds.count("issued") == 1
        assert kinds.count("refused") == 5
    finally:
        stores[1].close()
        stores[0].drop()
        stores[0].close()


@given(st.binary(max_size=600))
@settings(max_examples=200, deadline=None)
def test_csr_parser_raises_only_package_errors(data: bytes) -> None:
    """Random bytes as a CSR never raise anything but MalformedInput/VerificationError."""
    with contextlib.suppress(MalformedInput, VerificationError):
        parse_csr(data)


def test_ip_addresses_go_into_the_san(
    ca_keys: CaKeys, store: SqliteStore, factory: DocumentFactory, clock: Clock
) -> None:
    policy = ca_policy_from_mapping(
        {
            "services": {
                "web": {
                    "dns_names": ["web.test"],
                    "ip_addresses": ["127.0.0.1", "::1"],
                    "pcrs": [{str(i): PCRS[i].hex() for i in range(3)}],
                }
            }
        }
    )
    issuer = Issuer(ca_keys, policy, store, NitroEvidenceVerifier(factory.verifier()), clock=clock)
    csr, doc = _attest(issuer, factory)
    san = issuer.issue("web", csr, doc).certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


_POOL_FACTORY = DocumentFactory()
_POOL_OTHER = DocumentFactory(name="other root")
_POOL = [
    c.public_bytes(Encoding.DER)
    for c in (
        _POOL_FACTORY.root,
        _POOL_FACTORY.intermediate,
        _POOL_FACTORY.leaf,
        _POOL_OTHER.root,
        _POOL_OTHER.intermediate,
    )
]
_CACHED = NitroEvidenceVerifier(_POOL_FACTORY.verifier())


def _reshaped(bundle: list[int], leaf: int) -> bytes:
    import cbor2

    outer = cbor2.loads(_POOL_FACTORY.make(nonce=b"n" * 32))
    payload = cbor2.loads(outer[2])
    payload["cabundle"] = [_POOL[i] for i in bundle]
    payload["certificate"] = _POOL[leaf]
    outer[2] = cbor2.dumps(payload)
    return bytes(cbor2.dumps(outer))


def _verdict(verifier: NitroEvidenceVerifier, document: bytes) -> object:
    try:
        return verifier.precheck(document)
    except (MalformedInput, VerificationError) as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(_POOL) - 1), max_size=6), st.integers(0, len(_POOL) - 1))
def test_shape_check_cache_gives_the_same_verdict(bundle: list[int], leaf: int) -> None:
    """The remembered cabundle shape checks change no verdict: a verifier that has seen many
    shapes answers every document as a fresh one does (and twice in a row the same)."""
    document = _reshaped(bundle, leaf)
    fresh = _verdict(NitroEvidenceVerifier(_POOL_FACTORY.verifier()), document)
    assert _verdict(_CACHED, document) == fresh
    assert _verdict(_CACHED, document) == fresh
