"""Attacks on the verifier, each named after the attack (python-tuf style). One change per test."""

from __future__ import annotations

from datetime import timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from enclavekit.attestation import AttestationDocument, Verifier
from enclavekit.attestation.policy import AllOf, NonceEquals, NotDebug, PcrsEqual, UnsafeNoOp
from enclavekit.errors import MalformedInput, PolicyViolation, VerificationError
from enclavekit.pki.roots import aws_root
from tests.unit.attestation.conftest import real
from tests.unit.attestation.factory import (
    NOW,
    PROTECTED,
    TestPki,
    default_pcrs,
    encode_payload,
    envelope,
    make_document,
    payload_fields,
    sign,
)

ONE_SECOND = timedelta(seconds=1)


def verifier_for(pki: TestPki) -> Verifier:
    return Verifier([pki.root])


def _parts(raw: bytes) -> list[bytes]:
    return cbor2.loads(raw)


# -- trust anchors -------------------------------------------------------------------------------


def test_self_made_chain_with_mock_root_is_refused(pki: TestPki) -> None:
    """A consistent chain under an attacker's own root is not an AWS document."""
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        Verifier.aws().verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_real_aws_root_in_cabundle_over_attacker_intermediates_is_refused(pki: TestPki) -> None:
    """cabundle[0] = the genuine AWS root, but the leaf chains to attacker CAs: no path to the anchor."""
    bundle = [aws_root().public_bytes(Encoding.DER)] + pki.cabundle()[1:]
    raw = make_document(pki, cabundle=bundle)
    with pytest.raises(VerificationError, match="does not validate"):
        Verifier.aws().verify(raw, UnsafeNoOp(), at=NOW)


def test_cabundle_intermediates_are_never_trust_anchors(pki: TestPki) -> None:
    """Pinning an intermediate (e.g. by mistake) does not let documents anchor there."""
    intermediate = pki.cas[0][0]
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        Verifier([intermediate]).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_attacker_intermediate_offered_as_self_signed_anchor_is_refused(pki: TestPki) -> None:
    """A self-signed CA placed in the cabundle after a genuine root is only path material."""
    attacker = TestPki()
    bundle = [pki.root.public_bytes(Encoding.DER), attacker.root.public_bytes(Encoding.DER)] + [
        c.public_bytes(Encoding.DER) for c, _ in attacker.cas
    ]
    raw = make_document(attacker, cabundle=bundle)
    with pytest.raises(VerificationError, match="does not validate"):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_root_swapped_for_another_pinned_root_is_refused(pki: TestPki) -> None:
    """A document from one PKI does not verify against a verifier pinned to another."""
    other = TestPki()
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        verifier_for(other).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_genuine_aws_document_fails_against_emulator_style_root(pki: TestPki) -> None:
    raw = real("marlin-2024-08-prod.cbor")
    at = AttestationDocument.from_cbor(raw).timestamp
    with pytest.raises(VerificationError, match="not a pinned trust root"):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=at)


def test_synthetic_document_verifies_with_its_root_pinned(pki: TestPki) -> None:
    verified = verifier_for(pki).verify(make_document(pki), NotDebug(), at=NOW)
    assert verified.module_id == pki.module_id
    assert len(verified.chain) == 5


# -- validity windows (±1 s at each boundary) ------------------------------------------------------


def test_leaf_not_yet_valid_one_second_before_not_before_is_refused(pki: TestPki) -> None:
    start, _ = pki.leaf_window
    with pytest.raises(VerificationError):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=start - ONE_SECOND)


def test_leaf_valid_at_not_before(pki: TestPki) -> None:
    start, _ = pki.leaf_window
    verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=start)


def test_leaf_valid_at_not_after(pki: TestPki) -> None:
    _, end = pki.leaf_window
    verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=end)


def test_leaf_expired_one_second_after_not_after_is_refused(pki: TestPki) -> None:
    _, end = pki.leaf_window
    with pytest.raises(VerificationError):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=end + ONE_SECOND)


def test_cached_chain_is_not_used_after_expiry(pki: TestPki) -> None:
    """The chain cache is expiry-aware: a cached path does not outlive its certificates."""
    verifier = verifier_for(pki)
    raw = make_document(pki)
    verifier.verify(raw, UnsafeNoOp(), at=NOW)
    _, end = pki.leaf_window
    with pytest.raises(VerificationError):
        verifier.verify(raw, UnsafeNoOp(), at=end + ONE_SECOND)


def test_cached_chain_is_not_used_before_validity(pki: TestPki) -> None:
    verifier = verifier_for(pki)
    raw = make_document(pki)
    verifier.verify(raw, UnsafeNoOp(), at=NOW)
    start, _ = pki.leaf_window
    with pytest.raises(VerificationError):
        verifier.verify(raw, UnsafeNoOp(), at=start - ONE_SECOND)


def test_new_leaf_under_cached_ca_path_is_still_checked(pki: TestPki) -> None:
    """The CA-path cache short-cuts the CA links only; a leaf from another CA is still refused (with full
    path validation's message, as by a fresh verifier)."""
    verifier = verifier_for(pki)
    verifier.verify(make_document(pki), UnsafeNoOp(), at=NOW)
    foreign = TestPki()
    raw = make_document(
        pki, certificate=foreign.leaf.public_bytes(Encoding.DER), signing_key=foreign.leaf_key
    )
    with pytest.raises(VerificationError, match="does not validate"):
        verifier.verify(raw, UnsafeNoOp(), at=NOW)


def test_new_leaf_under_cached_ca_path_expired_is_refused(pki: TestPki) -> None:
    verifier = verifier_for(pki)
    verifier.verify(make_document(pki), UnsafeNoOp(), at=NOW)
    old = pki.leaf_not_before - timedelta(hours=5)
    expired_pki = TestPki.__new__(TestPki)
    expired_pki.__dict__.update(pki.__dict__)
    from tests.unit.attestation.factory import LEAF_LIFETIME, _cert

    leaf = _cert(
        "old-leaf", pki.leaf_key, pki.cas[-1][0], pki.cas[-1][1], old, old + LEAF_LIFETIME, ca=False
    )
    raw = make_document(pki, certificate=leaf.public_bytes(Encoding.DER))
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verifier.verify(raw, UnsafeNoOp(), at=NOW)


# -- signature -------------------------------------------------------------------------------------


def test_signature_bit_flip_is_refused() -> None:
    raw = real("marlin-2024-08-prod.cbor")
    parts = _parts(raw)
    parts[3] = parts[3][:10] + bytes([parts[3][10] ^ 0x01]) + parts[3][11:]
    at = AttestationDocument.from_cbor(raw).timestamp
    with pytest.raises(VerificationError, match="COSE signature does not verify"):
        Verifier.aws().verify(cbor2.dumps(parts), UnsafeNoOp(), at=at)


def test_payload_byte_flip_with_genuine_chain_is_refused() -> None:
    """A genuine AWS chain does not make an altered payload trustworthy."""
    raw = bytearray(real("evervault-2022-10-prod.cbor"))
    doc = AttestationDocument.from_cbor(bytes(raw))
    index = raw.index(doc.pcrs[0])
    raw[index] ^= 0x01
    with pytest.raises(VerificationError, match="COSE signature does not verify"):
        Verifier.aws().verify(bytes(raw), UnsafeNoOp(), at=doc.timestamp)


def test_payload_changed_and_resigned_with_foreign_key_is_refused() -> None:
    raw = real("marlin-2024-08-prod.cbor")
    parts = _parts(raw)
    fields = cbor2.loads(parts[2])
    fields["pcrs"][0] = b"\x66" * 48
    payload = cbor2.dumps(fields)
    parts[2] = payload
    parts[3] = sign(payload, ec.generate_private_key(ec.SECP384R1()))
    at = AttestationDocument.from_cbor(raw).timestamp
    with pytest.raises(VerificationError, match="COSE signature does not verify"):
        Verifier.aws().verify(cbor2.dumps(parts), UnsafeNoOp(), at=at)


def test_alg_header_changed_to_es256_is_refused(pki: TestPki) -> None:
    raw = make_document(pki, protected=cbor2.dumps({1: -7}))
    with pytest.raises(MalformedInput, match="ES384"):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_alg_header_with_extra_entries_is_refused(pki: TestPki) -> None:
    raw = make_document(pki, protected=cbor2.dumps({1: -35, 4: b"kid"}))
    with pytest.raises(MalformedInput, match="exactly"):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_signature_with_leading_zero_bytes_is_accepted(pki: TestPki) -> None:
    """r or s below 2^376 has a leading zero byte inside the fixed 96 bytes: still genuine."""
    payload = encode_payload(payload_fields(pki), indefinite=True)
    signature = sign(payload, pki.leaf_key, accept=lambda r, s: r < 2**376 or s < 2**376)
    assert signature[0] == 0 or signature[48] == 0
    verifier_for(pki).verify(envelope(PROTECTED, payload, signature), UnsafeNoOp(), at=NOW)


def test_truncated_signature_is_refused(pki: TestPki) -> None:
    parts = _parts(make_document(pki))
    parts[3] = parts[3][:95]
    with pytest.raises(MalformedInput, match="96"):
        verifier_for(pki).verify(cbor2.dumps(parts), UnsafeNoOp(), at=NOW)


def test_der_encoded_signature_is_refused(pki: TestPki) -> None:
    """COSE uses raw r ‖ s; an X.509-style DER signature is a different encoding."""
    parts = _parts(make_document(pki))
    from enclavekit.attestation.document import _encode_sig_structure

    parts[3] = pki.leaf_key.sign(
        _encode_sig_structure(parts[0], parts[2]), ec.ECDSA(hashes.SHA384())
    )
    with pytest.raises((MalformedInput, VerificationError)):
        verifier_for(pki).verify(cbor2.dumps(parts), UnsafeNoOp(), at=NOW)


# -- envelope and encoding ------------------------------------------------------------------------


def test_tag_18_envelope_is_accepted(pki: TestPki) -> None:
    verifier_for(pki).verify(make_document(pki, tag=18), UnsafeNoOp(), at=NOW)


def test_tag_other_than_18_is_refused(pki: TestPki) -> None:
    with pytest.raises(MalformedInput, match="tag 98"):
        verifier_for(pki).verify(make_document(pki, tag=98), UnsafeNoOp(), at=NOW)


def test_trailing_bytes_after_envelope_are_refused(pki: TestPki) -> None:
    with pytest.raises(MalformedInput, match="trailing"):
        verifier_for(pki).verify(make_document(pki) + b"\x00", UnsafeNoOp(), at=NOW)


def test_trailing_bytes_after_payload_map_are_refused(pki: TestPki) -> None:
    payload = encode_payload(payload_fields(pki)) + b"\xf6"
    with pytest.raises(MalformedInput, match="trailing"):
        verifier_for(pki).verify(make_document(pki, raw_payload=payload), UnsafeNoOp(), at=NOW)


def test_duplicate_payload_key_is_refused(pki: TestPki) -> None:
    """Two module_id entries: a last-write-wins parser could be confused by signed-but-odd payloads."""
    fields = payload_fields(pki)
    body = b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in fields.items())
    payload = b"\xaa" + body + cbor2.dumps("module_id") + cbor2.dumps("i-evil")
    with pytest.raises(MalformedInput, match="duplicate map key 'module_id'"):
        verifier_for(pki).verify(make_document(pki, raw_payload=payload), UnsafeNoOp(), at=NOW)


def test_duplicate_pcr_index_is_refused(pki: TestPki) -> None:
    fields = payload_fields(pki)
    pcrs = b"\xb1" + b"".join(cbor2.dumps(i) + cbor2.dumps(v) for i, v in default_pcrs().items())
    pcrs += cbor2.dumps(0) + cbor2.dumps(b"\x01" * 48)
    body = b"".join(
        cbor2.dumps(k) + (pcrs if k == "pcrs" else cbor2.dumps(v)) for k, v in fields.items()
    )
    payload = b"\xa9" + body
    with pytest.raises(MalformedInput, match="duplicate map key 0"):
        verifier_for(pki).verify(make_document(pki, raw_payload=payload), UnsafeNoOp(), at=NOW)


def test_indefinite_and_definite_payload_maps_both_verify(pki: TestPki) -> None:
    for indefinite in (True, False):
        raw = make_document(pki, indefinite=indefinite)
        assert (_parts(raw)[2][0] == 0xBF) == indefinite
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # One byte more than fits in a 4096-byte NSM Attestation request with only that field.
        ("user_data", b"u" * 4070, "request of at least 4097 bytes"),
        ("nonce", b"n" * 4074, "request of at least 4097 bytes"),
        ("public_key", b"k" * 4069, "request of at least 4097 bytes"),
        ("module_id", "", "module_id has 0 characters"),
        ("module_id", 5, "module_id must be a text string"),
        ("digest", "SHA256", "digest must be 'SHA384'"),
        ("timestamp", 0, "timestamp must be a positive"),
        ("timestamp", "1", "timestamp must be a positive"),
        ("timestamp", 2**63, "after 9999-12-31"),
        ("cabundle", [], "cabundle has 0 certificates"),
        ("cabundle", [b"x" * 1025], r"cabundle\[0\] is 1025 bytes"),
        ("certificate", b"", "certificate is 0 bytes"),
        ("pcrs", {}, "pcrs has 0 entries"),
        ("pcrs", {0: b"\x00" * 47}, r"pcrs\[0\] is 47 bytes"),
        ("pcrs", {32: b"\x00" * 48}, "pcrs index 32"),
        ("pcrs", {-1: b"\x00" * 48}, "pcrs index -1"),
        ("pcrs", {"0": b"\x00" * 48}, "pcrs index '0'"),
        ("pcrs", [b"\x00" * 48], "pcrs must be a map"),
        ("user_data", "text", "user_data must be a byte string"),
    ],
)
def test_oversized_or_wrong_typed_field_is_refused(
    pki: TestPki, field: str, value: object, message: str
) -> None:
    raw = make_document(pki, **{field: value})
    with pytest.raises(MalformedInput, match=message):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_missing_mandatory_field_is_refused(pki: TestPki) -> None:
    fields = payload_fields(pki)
    del fields["certificate"]
    payload = encode_payload(fields)
    with pytest.raises(MalformedInput, match="'certificate'"):
        verifier_for(pki).verify(make_document(pki, raw_payload=payload), UnsafeNoOp(), at=NOW)


def test_oversized_document_is_refused_before_decoding(pki: TestPki) -> None:
    with pytest.raises(MalformedInput, match="expected at most"):
        AttestationDocument.from_cbor(b"\x84" + b"\x00" * 20000)


def test_deeply_nested_payload_is_refused(pki: TestPki) -> None:
    payload = b"\x81" * 5000 + b"\x00"
    with pytest.raises(MalformedInput, match="nest"):
        verifier_for(pki).verify(make_document(pki, raw_payload=payload), UnsafeNoOp(), at=NOW)


def test_unknown_extra_keys_are_ignored(pki: TestPki) -> None:
    raw = make_document(pki, future_field=b"x", another={"a": 1})
    verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_empty_user_data_is_distinct_from_null(pki: TestPki) -> None:
    verified = verifier_for(pki).verify(make_document(pki, user_data=b""), UnsafeNoOp(), at=NOW)
    assert verified.user_data == b""
    assert verified.nonce is None


def test_seventeen_or_more_pcrs_are_accepted(pki: TestPki) -> None:
    verified = verifier_for(pki).verify(
        make_document(pki, pcrs=default_pcrs(count=18)), UnsafeNoOp(), at=NOW
    )
    assert sorted(verified.pcrs) == list(range(18))


def test_nitrotpm_document_is_recognised(pki: TestPki) -> None:
    fields = payload_fields(pki, module_id="i-0123456789abcdef0-tpm0123456789abcdef")
    fields["nitrotpm_pcrs"] = fields.pop("pcrs")
    raw = make_document(pki, raw_payload=encode_payload(fields, indefinite=True))
    verified = verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW, allow_nitrotpm=True)
    assert verified.is_nitrotpm
    assert verified.pcrs == {}
    assert verified.nitrotpm_pcrs[1] == b"\xa1" * 48


def test_document_with_both_pcr_maps_is_refused(pki: TestPki) -> None:
    raw = make_document(pki, nitrotpm_pcrs=default_pcrs())
    with pytest.raises(MalformedInput, match="exactly one of"):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)


# -- certificate profile -----------------------------------------------------------------------------


def test_leaf_that_is_a_ca_is_refused() -> None:
    pki = TestPki(leaf_is_ca=True)
    with pytest.raises(VerificationError):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_leaf_without_digital_signature_is_refused() -> None:
    pki = TestPki(leaf_key_usage="no-digital-signature")
    with pytest.raises(VerificationError, match="digitalSignature"):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_p256_leaf_is_refused() -> None:
    pki = TestPki(leaf_curve=ec.SECP256R1())
    with pytest.raises(VerificationError, match="P-384"):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_p521_leaf_does_not_crash_the_verifier() -> None:
    """nitrite panics on a self-signed P-521 leaf; we refuse it cleanly."""
    pki = TestPki(leaf_curve=ec.SECP521R1())
    with pytest.raises(VerificationError, match="P-384"):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=NOW)


def test_garbage_certificate_is_refused(pki: TestPki) -> None:
    with pytest.raises(MalformedInput, match="not a valid DER X.509"):
        verifier_for(pki).verify(
            make_document(pki, certificate=b"\x30\x03\x02\x01\x01"), UnsafeNoOp(), at=NOW
        )


# -- policy attacks ----------------------------------------------------------------------------------


def test_debug_document_against_production_policy_lists_every_failure(pki: TestPki) -> None:
    raw = make_document(pki, pcrs=default_pcrs(debug=True))
    production = AllOf([NotDebug(), PcrsEqual({i: default_pcrs()[i] for i in (0, 1, 2)})])
    with pytest.raises(PolicyViolation) as caught:
        verifier_for(pki).verify(raw, production, at=NOW)
    checks = [f.check for f in caught.value.failures]
    assert checks == ["debug mode", "PCR0", "PCR1", "PCR2"]


def test_nonce_mismatch_is_refused(pki: TestPki) -> None:
    raw = make_document(pki, nonce=b"\x01" * 32)
    with pytest.raises(PolicyViolation, match="nonce"):
        verifier_for(pki).verify(raw, NonceEquals(b"\x02" * 32), at=NOW)


def test_missing_nonce_does_not_pass_a_nonce_policy(pki: TestPki) -> None:
    with pytest.raises(PolicyViolation, match="found absent"):
        verifier_for(pki).verify(make_document(pki), NonceEquals(b"\x02" * 32), at=NOW)


def test_debug_document_with_zero_expectation_is_still_debug(pki: TestPki) -> None:
    """Eternis treats an expected all-zero PCR as a wildcard; we compare and still refuse debug."""
    raw = make_document(pki, pcrs=default_pcrs(debug=True))
    with pytest.raises(PolicyViolation, match="debug mode"):
        verifier_for(pki).verify(raw, AllOf([NotDebug(), PcrsEqual({0: bytes(48)})]), at=NOW)


def test_verifier_requires_a_trust_root() -> None:
    with pytest.raises(ValueError, match="at least one trust root"):
        Verifier([])


def test_naive_time_is_refused(pki: TestPki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verifier_for(pki).verify(make_document(pki), UnsafeNoOp(), at=NOW.replace(tzinfo=None))


def test_verified_attestation_cannot_be_forged() -> None:
    from enclavekit.attestation import VerifiedAttestation

    with pytest.raises(TypeError, match="only by"):
        VerifiedAttestation(  # type: ignore[call-arg]
            module_id="x",
            timestamp=NOW,
            pcrs={},
            public_key=None,
            user_data=None,
            nonce=None,
            certificate=None,
            is_debug=False,
            is_nitrotpm=False,
            verified_at=NOW,
            chain=(),
            document=None,
            raw=b"",
        )


@pytest.mark.parametrize("workers", [1, 2])
def test_batch_verification_reports_each_document(pki: TestPki, workers: int) -> None:
    good = make_document(pki)
    bad = make_document(pki) + b"\x00"
    debug = make_document(pki, pcrs=default_pcrs(debug=True))
    results = verifier_for(pki).verify_many(
        [good, bad, debug, good], NotDebug(), at=NOW, workers=workers
    )
    assert [type(r).__name__ for r in results] == [
        "VerifiedAttestation",
        "MalformedInput",
        "PolicyViolation",
        "VerifiedAttestation",
    ]


def test_pem_root_loading(tmp_path: object, pki: TestPki) -> None:
    from pathlib import Path

    from enclavekit.pki.roots import load_pem_roots

    path = Path(str(tmp_path)) / "root.pem"
    path.write_bytes(pki.root.public_bytes(Encoding.PEM))
    assert load_pem_roots(path) == [pki.root]
    (Path(str(tmp_path)) / "bad.pem").write_text("nope")
    with pytest.raises(MalformedInput):
        load_pem_roots(Path(str(tmp_path)) / "bad.pem")
    assert isinstance(aws_root(), x509.Certificate)


def test_ca_with_a_p256_key_in_the_chain_is_refused() -> None:
    """Every certificate of the chain must be P-384, CA certificates included."""
    from datetime import timedelta as _td

    from tests.unit.attestation.factory import LEAF_LIFETIME, _cert

    pki = TestPki()
    zonal, zonal_key = pki.cas[1]
    weak_key = ec.generate_private_key(ec.SECP256R1())
    weak_ca = _cert(
        "instance.test", weak_key, zonal, zonal_key, NOW - _td(days=1), NOW + _td(days=1),
        ca=True, path_len=0,
    )  # fmt: skip
    leaf = _cert(
        "leaf", pki.leaf_key, weak_ca, weak_key, pki.leaf_not_before,
        pki.leaf_not_before + LEAF_LIFETIME, ca=False,
    )  # fmt: skip
    bundle = pki.cabundle()[:3] + [weak_ca.public_bytes(Encoding.DER)]
    raw = make_document(pki, certificate=leaf.public_bytes(Encoding.DER), cabundle=bundle)
    with pytest.raises(
        VerificationError, match=r"cabundle\[3\] has a secp256r1 key; expected EC P-384"
    ):
        verifier_for(pki).verify(raw, UnsafeNoOp(), at=NOW)
