"""Every real document verifies or fails exactly as INDEX.md says, for the stated reason."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from enclavekit.attestation import AttestationDocument, Verifier
from enclavekit.attestation.policy import AllOf, NotDebug, PcrsEqual, UnsafeNoOp
from enclavekit.errors import PolicyViolation, VerificationError
from tests.unit.attestation.conftest import REAL, REAL_VECTORS, real


def test_every_vector_is_listed() -> None:
    assert sorted(p.name for p in REAL.glob("*.cbor")) == sorted(REAL_VECTORS)


@pytest.mark.parametrize("name", [n for n, (r, _) in REAL_VECTORS.items() if r == "valid"])
def test_genuine_document_verifies_at_its_own_time(name: str) -> None:
    raw = real(name)
    doc = AttestationDocument.from_cbor(raw)
    verified = Verifier.aws().verify(raw, UnsafeNoOp(), at=doc.timestamp)
    assert verified.module_id == doc.module_id
    assert verified.is_debug == REAL_VECTORS[name][1]
    assert len(verified.chain) == 5
    assert verified.root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    assert not verified.is_nitrotpm
    # PCR4 = SHA-384(48 zero bytes ‖ instance id) on every genuine document (INDEX.md).
    import hashlib

    assert doc.instance_id is not None
    assert verified.pcrs[4] == hashlib.sha384(bytes(48) + doc.instance_id.encode()).digest()


@pytest.mark.parametrize("name", [n for n, (r, _) in REAL_VECTORS.items() if r == "valid"])
def test_genuine_document_is_expired_today(name: str) -> None:
    with pytest.raises(VerificationError, match="does not validate"):
        Verifier.aws().verify(real(name), UnsafeNoOp(), at=datetime(2026, 11, 26, tzinfo=UTC))


@pytest.mark.parametrize("name", [n for n, (r, d) in REAL_VECTORS.items() if r == "valid" and d])
def test_debug_document_is_refused_by_default_policy(name: str) -> None:
    raw = real(name)
    at = AttestationDocument.from_cbor(raw).timestamp
    with pytest.raises(PolicyViolation, match="debug mode"):
        Verifier.aws().verify(raw, NotDebug(), at=at)


def test_mock_root_document_is_refused_with_the_reason() -> None:
    raw = real("marlin-2024-12-MOCKROOT.cbor")
    at = AttestationDocument.from_cbor(raw).timestamp
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        Verifier.aws().verify(raw, UnsafeNoOp(), at=at)


def test_production_document_satisfies_its_own_pcrs() -> None:
    raw = real("marlin-2024-08-prod.cbor")
    doc = AttestationDocument.from_cbor(raw)
    policy = AllOf([NotDebug(), PcrsEqual({i: doc.pcrs[i] for i in (0, 1, 2)})])
    assert Verifier.aws().verify(raw, policy, at=doc.timestamp).pcrs[0] == doc.pcrs[0]


def test_two_documents_share_one_leaf_and_hit_the_cache() -> None:
    a, b = real("marlin-2024-08-prod.cbor"), real("marlin-2024-08-prod-b.cbor")
    verifier = Verifier.aws()
    va = verifier.verify(a, UnsafeNoOp(), at=AttestationDocument.from_cbor(a).timestamp)
    vb = verifier.verify(b, UnsafeNoOp(), at=AttestationDocument.from_cbor(b).timestamp)
    assert va.chain == vb.chain
    assert va.timestamp + timedelta(minutes=6) > vb.timestamp > va.timestamp


def test_bitkey_document_with_pcr8_verifies() -> None:
    from tests.conftest import ASSETS

    raw = base64.b64decode(
        (ASSETS / "attestation" / "bitkey-attestation-2024-07-17.b64").read_text()
    )
    doc = AttestationDocument.from_cbor(raw)
    verified = Verifier.aws().verify(raw, NotDebug(), at=doc.timestamp)
    assert any(verified.pcrs[8])
    assert verified.nonce == bytes.fromhex("040506")
    assert verified.user_data == bytes.fromhex("010203")


def test_high_s_signatures_are_accepted() -> None:
    """8 of the 13 genuine documents have s > n/2; AWS does not normalise s."""
    n384 = int(
        "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
        16,
    )
    high = [
        name
        for name, (r, _) in REAL_VECTORS.items()
        if r == "valid"
        and int.from_bytes(AttestationDocument.from_cbor(real(name)).signature[48:], "big")
        > n384 // 2
    ]
    assert len(high) == 8
