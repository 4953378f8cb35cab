"""Attacks on the verifier's chain caches and on byte-pattern shortcuts (issue 14, items 2 and 3).

Each attack test verifies the same document with a fresh verifier and with a long-lived one whose caches
were filled by other documents first: the verdict may not depend on what the verifier saw before.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

from enclavekit.attestation import Verifier
from enclavekit.attestation.policy import UnsafeNoOp
from enclavekit.errors import MalformedInput, VerificationError
from tests.unit.attestation.factory import (
    LEAF_LIFETIME,
    NOW,
    TestPki,
    _cert,
    _name,
    make_document,
)

#: The P-384 SubjectPublicKeyInfo DER up to the point (SEQUENCE, AlgorithmIdentifier, BIT STRING header).
P384_SPKI_HEADER = bytes.fromhex("3076301006072a8648ce3d020106052b8104002203620004")


def _leaf(
    pki: TestPki,
    *,
    extension: x509.ExtensionType | None = None,
    critical: bool = False,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    subject: str = "another-leaf.test.aws",
) -> bytes:
    """A leaf for ``pki.leaf_key`` like the factory's, optionally with one more extension or issuer."""
    ca, ca_key = issuer or pki.cas[-1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca.subject)
        .public_key(pki.leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.leaf_not_before)
        .not_valid_after(pki.leaf_not_before + LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, False, False, False, False),
            critical=False,
        )
    )
    if extension is not None:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(ca_key, hashes.SHA384()).public_bytes(Encoding.DER)


def _warm(pki: TestPki) -> Verifier:
    """A verifier that has verified the PKI's ordinary document: its cabundle's CA path is cached."""
    verifier = Verifier([pki.root])
    verifier.verify(make_document(pki), UnsafeNoOp(), at=NOW)
    return verifier


def _verdict(verifier: Verifier, raw: bytes) -> str:
    try:
        verifier.verify(raw, UnsafeNoOp(), at=NOW)
    except (VerificationError, MalformedInput) as exc:
        return type(exc).__name__
    return "ok"


# -- item 2: the warm path applies the same leaf profile ----------------------------------------------


def test_attack_warm_verifier_accepts_leaf_with_unrecognised_critical_extension(
    pki: TestPki,
) -> None:
    """RFC 5280 §4.2: a certificate with a critical extension the validator does not know is refused."""
    unknown = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.14.2"), b"\x05\x00")
    raw = make_document(pki, certificate=_leaf(pki, extension=unknown, critical=True))
    with pytest.raises(VerificationError, match="1.3.6.1.4.1.55555.14.2"):
        Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)
    with pytest.raises(VerificationError, match="1.3.6.1.4.1.55555.14.2"):
        _warm(pki).verify(raw, UnsafeNoOp(), at=NOW)


def test_attack_warm_verifier_accepts_leaf_with_critical_policy_constraints(pki: TestPki) -> None:
    constraints = x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None)
    raw = make_document(pki, certificate=_leaf(pki, extension=constraints, critical=True))
    with pytest.raises(VerificationError, match="2.5.29.36"):
        Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)
    with pytest.raises(VerificationError, match="2.5.29.36"):
        _warm(pki).verify(raw, UnsafeNoOp(), at=NOW)


@pytest.mark.parametrize("issuer", [0, 1, "root"], ids=["regional", "zonal", "root"])
def test_attack_warm_verifier_refuses_leaf_issued_by_another_ca_of_the_bundle(
    pki: TestPki, issuer: int | str
) -> None:
    """A leaf hanging below another CA of the same cabundle is valid (RFC 5280) warm and cold alike."""
    ca = (pki.root, pki.root_key) if issuer == "root" else pki.cas[int(issuer)]
    raw = make_document(pki, certificate=_leaf(pki, issuer=ca))
    fresh = Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)
    warm = _warm(pki).verify(raw, UnsafeNoOp(), at=NOW)
    assert warm.chain == fresh.chain
    assert warm.chain[1] == ca[0]


def test_warm_verifier_refusal_says_what_a_fresh_verifier_says(pki: TestPki) -> None:
    """A leaf of a foreign PKI under a cached cabundle: the refusal is full path validation's."""
    foreign = TestPki()
    raw = make_document(
        pki, certificate=foreign.leaf.public_bytes(Encoding.DER), signing_key=foreign.leaf_key
    )
    messages = []
    for verifier in (Verifier([pki.root]), _warm(pki)):
        with pytest.raises(VerificationError) as caught:
            verifier.verify(raw, UnsafeNoOp(), at=NOW)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "does not validate" in messages[0]


def test_attack_warm_verifier_accepts_document_whose_cabundle_spills_into_the_leaf(
    pki: TestPki,
) -> None:
    """The cache key must encode (cabundle, leaf) injectively.

    Document A is ordinary: cabundle ``[root, regional, zonal, instance]`` and a (small) leaf. Document B has
    the cabundle ``[root, regional, zonal]`` and, as its "certificate", the bytes ``len(instance) ‖ instance ‖
    leaf`` — not a certificate at all. Keyed by the concatenation of length-prefixed cabundle entries followed
    by the bare leaf, both documents had the same cache key, and B was accepted with A's chain.
    """
    instance, instance_key = pki.cas[-1]
    small_leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "l")]))
        .issuer_name(instance.subject)
        .public_key(pki.leaf_key.public_key())
        .serial_number(1)
        .not_valid_before(pki.leaf_not_before)
        .not_valid_after(pki.leaf_not_before + LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=False,
        )
        .sign(instance_key, hashes.SHA384())
        .public_bytes(Encoding.DER)
    )
    instance_der = instance.public_bytes(Encoding.DER)
    spliced = len(instance_der).to_bytes(2, "big") + instance_der + small_leaf
    assert len(spliced) <= 1024  # within the decoder's certificate size limit
    doc_a = make_document(pki, certificate=small_leaf)
    doc_b = make_document(pki, certificate=spliced, cabundle=pki.cabundle()[:-1])
    assert _verdict(Verifier([pki.root]), doc_a) == "ok"
    assert _verdict(Verifier([pki.root]), doc_b) == "MalformedInput"
    warm = Verifier([pki.root])
    warm.verify(doc_a, UnsafeNoOp(), at=NOW)
    assert _verdict(warm, doc_b) == "MalformedInput"


def test_extra_certificate_in_the_cabundle_is_not_cached_yet_verifies(pki: TestPki) -> None:
    """A cabundle that is more than the path is valid but never cached: its path search is not provably
    the cached one at another instant (pyca's search budget, other candidates)."""
    extra = TestPki().root.public_bytes(Encoding.DER)
    raw = make_document(pki, cabundle=[*pki.cabundle(), extra])
    verifier = Verifier([pki.root])
    for _ in range(2):
        verifier.verify(raw, UnsafeNoOp(), at=NOW)
    assert not verifier._paths._entries
    assert not verifier._ca_paths._entries


# -- item 3: decisions on parsed structure --------------------------------------------------------------


def test_attack_p256_ca_with_p384_key_header_inside_an_extension_is_refused() -> None:
    """The "every certificate EC P-384" rule reads the SubjectPublicKeyInfo, not any bytes of the DER."""
    pki = TestPki()
    zonal, zonal_key = pki.cas[1]
    weak_key = ec.generate_private_key(ec.SECP256R1())
    decoy = x509.UnrecognizedExtension(
        ObjectIdentifier("1.3.6.1.4.1.55555.14.3"), P384_SPKI_HEADER + bytes(96)
    )
    weak_ca = (
        x509.CertificateBuilder()
        .subject_name(_name("instance.test"))
        .issuer_name(zonal.subject)
        .public_key(weak_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(decoy, critical=False)
        .sign(zonal_key, hashes.SHA384())
    )
    assert P384_SPKI_HEADER in weak_ca.public_bytes(Encoding.DER)
    leaf = _cert(
        "leaf", pki.leaf_key, weak_ca, weak_key, pki.leaf_not_before,
        pki.leaf_not_before + LEAF_LIFETIME, ca=False,
    )  # fmt: skip
    bundle = pki.cabundle()[:3] + [weak_ca.public_bytes(Encoding.DER)]
    raw = make_document(pki, certificate=leaf.public_bytes(Encoding.DER), cabundle=bundle)
    with pytest.raises(
        VerificationError, match=r"cabundle\[3\] has a secp256r1 key; expected EC P-384"
    ):
        Verifier([pki.root]).verify(raw, UnsafeNoOp(), at=NOW)


def test_p384_ca_without_the_key_header_elsewhere_is_accepted(pki: TestPki) -> None:
    """The structural check accepts what it should: the ordinary chain verifies, cold and warm."""
    raw = make_document(pki)
    assert _verdict(Verifier([pki.root]), raw) == "ok"
    assert _verdict(_warm(pki), raw) == "ok"


def test_pyca_matches_issuer_names_by_their_encoding() -> None:
    """Canary for the caches' soundness argument (verifier.Verifier._validate_chain): pyca offers a
    certificate as an issuer candidate only when its subject's DER equals the child's issuer DER, so a
    cabundle whose subject encodings are distinct has one candidate per level. If a pyca upgrade starts
    matching names loosely (here: the same text as PrintableString and as UTF8String), this fails and
    ``Verifier._is_simple`` must compare names as pyca does."""
    from cryptography.x509 import verification as pkix
    from cryptography.x509.name import _ASN1Type

    key = ec.derive_private_key(141, ec.SECP384R1())

    def name(kind: _ASN1Type, value: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, _type=kind)])

    printable = name(_ASN1Type.PrintableString, "ca")
    root = _cert_with(printable, printable, key, ca=True)
    leaf = _cert_with(
        name(_ASN1Type.UTF8String, "leaf"), name(_ASN1Type.UTF8String, "ca"), key, ca=False
    )
    assert root.subject == leaf.issuer  # equal for Python's Name, yet not for pyca's path building
    verifier = (
        pkix.PolicyBuilder()
        .store(pkix.Store([root]))
        .time(NOW.replace(tzinfo=None))
        .extension_policies(
            ca_policy=pkix.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=pkix.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    with pytest.raises(pkix.VerificationError, match="candidates exhausted"):
        verifier.verify(leaf, [])


def _cert_with(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1 if ca else 2)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(key, hashes.SHA384())
