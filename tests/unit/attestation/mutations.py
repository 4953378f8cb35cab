"""A corpus of mutated attestation documents, generated at test time from the emulated AWS PKI.

Used by ``test_warm_cold.py``: every document must get the same verdict from a fresh verifier and from a
long-lived one that has verified the others. The list of mutations is fixed (the same documents, in the
same order, every run); the key material is fresh each run (``EmulatedAwsPki.ephemeral``, plus keys derived
from fixed seeds for the crafted certificates), which no verdict depends on.

Families (``Case.name`` starts with the family):

- ``payload/``: one field of a genuine emulated document changed (or removed, or an extra key added) and
  re-signed with the genuine leaf key, for three leaves (two enclaves on one instance, one on another),
  definite and indefinite payload maps;
- ``leaf/``: crafted leaves under the genuine CAs — extensions (unrecognised or unprocessed critical ones,
  constraints, EKU, SAN, missing or wrong basicConstraints/keyUsage), validity windows, issuers (every CA
  of the bundle, the other instance, itself, a mismatched name), signature hashes, key types;
- ``ca/``: crafted instance CAs (CA flags, pathLen, keyUsage, constraints, critical extensions, key types,
  validity, hashes) with a leaf under them, and crafted cabundles (extra, duplicated, reordered, foreign,
  impostor certificates; the root not first; a foreign PKI);
- ``envelope/``: COSE_Sign1 variants (tags, protected and unprotected headers, signature sizes and bits,
  array shapes, trailing bytes);
- ``cbor/``: encodings of the same payload (key order, indefinite-length items, non-minimal integers,
  duplicate keys, tags, trailing bytes).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from enclavekit.pki.emulated import EmulatedAwsPki, IssuedCertificate, SigningCredentials

#: The instant the emulated PKI issues its chain at (leaf: T - 3 s .. T + 3 h; instance CA: 1 day).
T = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
#: Verification instants: inside every window; near the leaf's end; before the leaf; after the leaf; after
#: the instance CA.
TIMES = (
    T + timedelta(minutes=1),
    T + timedelta(hours=2, minutes=59),
    T - timedelta(hours=1),
    T + timedelta(hours=3, seconds=1),
    T + timedelta(days=2),
)
PROTECTED = b"\xa1\x01\x38\x22"
INSTANCES = ("i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2")
MISSING = object()  # a payload key left out

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes spliced into a payload as they are (an encoded CBOR item)."""

    encoded: bytes


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _key(seed: int, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(1_000_003 * seed + 14, curve or ec.SECP384R1())


def _enc(value: Any) -> bytes:
    return value.encoded if isinstance(value, Raw) else cbor2.dumps(value)


def encode_map(items: list[tuple[Any, Any]], *, indefinite: bool) -> bytes:
    body = b"".join(_enc(k) + _enc(v) for k, v in items)
    if indefinite:
        return b"\xbf" + body + b"\xff"
    n = len(items)
    return (bytes([0xA0 | n]) if n < 24 else bytes([0xB8, n])) + body


def sign(payload: bytes, key: PrivateKey, protected: bytes = PROTECTED) -> bytes:
    """ES384 r ‖ s over the COSE Sig_structure (96 arbitrary bytes for keys that cannot make one)."""
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.key_size > 384:
        return bytes(range(96))
    r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def envelope(
    protected: bytes, payload: bytes, signature: bytes, *, tag: int | None = None
) -> bytes:
    body = [protected, {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(tag, body) if tag is not None else body)


def _pcrs() -> dict[int, bytes]:
    pcrs = {i: bytes(48) for i in range(16)}
    pcrs[0], pcrs[1], pcrs[2] = b"\xa0" * 48, b"\xa1" * 48, b"\xa2" * 48
    return pcrs


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


SHA384 = hashes.SHA384()
_LEAF_KU = x509.KeyUsage(True, True, False, False, False, False, False, False, False)
_CA_KU = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
_UNKNOWN = ObjectIdentifier("1.3.6.1.4.1.55555.14.9")
_P384_SPKI_PREFIX = bytes.fromhex("3076301006072a8648ce3d020106052b8104002203620004")


def certificate(
    subject: x509.Name,
    key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    extensions: list[tuple[x509.ExtensionType, bool]],
    *,
    hash_alg: hashes.HashAlgorithm | None = SHA384,
    serial: int = 0x0E14,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hash_alg
    return builder.sign(issuer_key, algorithm)  # type: ignore[arg-type]


class Corpus:
    """The emulated PKI, its genuine leaves and every mutated document (``cases``)."""

    def __init__(self) -> None:
        self.pki = EmulatedAwsPki.ephemeral(clock=lambda: T)
        module_ids = (f"{INSTANCES[0]}-enc0000000000000001", f"{INSTANCES[0]}-enc0000000000000002")
        self.creds = [
            self.pki.credentials(module_id=m, instance_id=INSTANCES[0], enclave_id=i + 1, now=T)
            for i, m in enumerate(module_ids)
        ]
        self.creds.append(
            self.pki.credentials(
                module_id=f"{INSTANCES[1]}-enc0000000000000003",
                instance_id=INSTANCES[1],
                enclave_id=3,
                now=T,
            )
        )
        # The emulated CAs and their keys (private to the emulator; a test may look).
        regional, zonal = self.pki._regional, self.pki._zonal
        assert regional is not None and zonal is not None
        self.root: IssuedCertificate = self.pki.root
        self.regional: IssuedCertificate = regional
        self.zonal: IssuedCertificate = zonal
        self.instances = [self.pki._instances[i] for i in INSTANCES]
        self.foreign = EmulatedAwsPki.ephemeral(clock=lambda: T)
        self.foreign_creds = self.foreign.credentials(
            module_id=f"{INSTANCES[0]}-enc0000000000000001",
            instance_id=INSTANCES[0],
            enclave_id=1,
            now=T,
        )

    @functools.cached_property
    def cases(self) -> list[Case]:
        cases = [
            *self._payload_cases(),
            *self._leaf_cases(),
            *self._ca_cases(),
            *self._envelope_cases(),
            *self._cbor_cases(),
        ]
        names = [c.name for c in cases]
        assert len(set(names)) == len(names), "case names must be unique"
        return cases

    # -- building blocks ---------------------------------------------------------------------------

    def fields(self, creds: SigningCredentials, **overrides: Any) -> list[tuple[Any, Any]]:
        module_id = self._module_id(creds)
        items: dict[str, Any] = {
            "module_id": module_id,
            "digest": "SHA384",
            "timestamp": Raw(b"\x1b" + (int(T.timestamp()) * 1000 + 1).to_bytes(8, "big")),
            "pcrs": _pcrs(),
            "certificate": creds.certificate,
            "cabundle": list(creds.cabundle),
            "public_key": None,
            "user_data": None,
            "nonce": None,
        }
        items.update(overrides)
        return [(k, v) for k, v in items.items() if v is not MISSING]

    def _module_id(self, creds: SigningCredentials) -> str:
        leaf = x509.load_der_x509_certificate(creds.certificate)
        cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert isinstance(cn, str)
        return cn.rsplit(".", 2)[0]

    def document(
        self,
        creds: SigningCredentials,
        *,
        key: PrivateKey | None = None,
        indefinite: bool = True,
        **overrides: Any,
    ) -> bytes:
        payload = encode_map(self.fields(creds, **overrides), indefinite=indefinite)
        return envelope(PROTECTED, payload, sign(payload, key or creds.key))

    # -- families ----------------------------------------------------------------------------------

    def _payload_cases(self) -> Iterator[Case]:
        a = self.creds[0]
        other_leaf = self.creds[1].certificate
        bundle = list(a.cabundle)
        root, regional, zonal, instance = bundle
        foreign_root = self.foreign.root.der
        values: dict[str, list[tuple[str, Any]]] = {
            "module_id": [
                ("empty", ""),
                ("257-chars", "x" * 257),
                ("int", 7),
                ("bytes", b"i-0"),
                ("tpm", f"{INSTANCES[0]}-tpm0000000000000001"),
                ("unicode", "i-\u00e9"),
                ("null", None),
            ],
            "digest": [
                ("SHA256", "SHA256"),
                ("lower", "sha384"),
                ("newline", "SHA384\n"),
                ("int", 384),
                ("null", None),
                ("SHA512", "SHA512"),
            ],
            "timestamp": [
                ("zero", 0),
                ("negative", -1),
                ("u64-max", 2**64 - 1),
                ("float", 1.7e12),
                ("text", "1"),
                ("null", None),
                ("true", True),
                ("year-9999", 253_402_300_799_999),
                ("year-10000", 253_402_300_800_000),
                ("minimal-encoding", int(T.timestamp()) * 1000),
            ],
            "pcrs": [
                ("empty", {}),
                ("33-entries", {i: bytes(48) for i in range(33)}),
                ("index-32", {32: bytes(48)}),
                ("index-negative", {-1: bytes(48)}),
                ("index-true", {True: bytes(48)}),
                ("index-text", {"0": bytes(48)}),
                ("value-empty", {0: b""}),
                ("value-31", {0: bytes(31)}),
                ("value-32", {0: bytes(32)}),
                ("value-47", {0: bytes(47)}),
                ("value-64", {0: bytes(64)}),
                ("value-65", {0: bytes(65)}),
                ("value-text", {0: "00" * 48}),
                ("value-null", {0: None}),
                ("null", None),
                ("array", [bytes(48)]),
                ("mixed-sizes", {0: bytes(48), 1: bytes(32)}),
                ("debug", {i: bytes(48) for i in range(16)}),
                ("single", {4: b"\x04" * 48}),
            ],
            "certificate": [
                ("empty", b""),
                ("one-byte", b"\x30"),
                ("garbage", bytes(range(200))),
                ("truncated", a.certificate[:-1]),
                ("trailing-byte", a.certificate + b"\x00"),
                ("other-leaf", other_leaf),
                ("ca-instance", instance),
                ("root", root),
                ("null", None),
                ("int", 5),
                ("array", [a.certificate]),
            ],
            "cabundle": [
                ("empty", []),
                ("null", None),
                ("bytes", root),
                ("eleven", [root] * 11),
                ("reversed", bundle[::-1]),
                ("root-only", [root]),
                ("no-instance", bundle[:-1]),
                ("instance-twice", [*bundle, instance]),
                ("other-instance", list(self.creds[2].cabundle)),
                ("foreign-root-first", [foreign_root, regional, zonal, instance]),
                ("foreign-root-appended", [*bundle, foreign_root]),
                ("empty-entry", [root, regional, zonal, b""]),
                ("int-entry", [root, regional, zonal, 5]),
                ("regional-zonal-swapped", [root, zonal, regional, instance]),
                ("no-root", [regional, zonal, instance]),
                ("root-twice", [root, root, regional, zonal, instance]),
            ],
        }
        for name in ("public_key", "user_data", "nonce"):
            values[name] = [
                ("empty", b""),
                ("1024", bytes(1024)),
                ("1025", bytes(1025)),
                ("2000", bytes(2000)),
                ("text", "k"),
                ("int", 0),
                ("32", b"\x07" * 32),
            ]
        variants: list[tuple[str, dict[str, Any]]] = [("genuine", {})]
        for key, options in values.items():
            variants += [(f"{key}={label}", {key: value}) for label, value in options]
            variants.append((f"{key}=missing", {key: MISSING}))
        extras: list[tuple[str, Any]] = [
            ("int", 0),
            ("text", "x"),
            ("bytes", b""),
            ("null", None),
            ("array", []),
            ("map", {}),
            ("float", 1.5),
            ("undefined", cbor2.undefined),
            ("simple", cbor2.CBORSimpleValue(99)),
        ]
        variants += [(f"extra-key={label}", {"extra": value}) for label, value in extras]
        variants.append(("tpm-pcrs", {"pcrs": MISSING, "nitrotpm_pcrs": _pcrs()}))
        variants.append(("both-pcr-maps", {"nitrotpm_pcrs": _pcrs()}))
        tpm_module = f"{INSTANCES[0]}-tpm0000000000000001"
        variants.append(
            ("tpm-document", {"module_id": tpm_module, "pcrs": MISSING, "nitrotpm_pcrs": _pcrs()})
        )
        for i, creds in enumerate(self.creds):
            for label, overrides in variants:
                for indefinite in (True, False):
                    shape = "indefinite" if indefinite else "definite"
                    raw = self.document(creds, indefinite=indefinite, **overrides)
                    yield Case(f"payload/leaf{i}/{label}/{shape}", raw)

    def _leaf(
        self,
        seed: int,
        *,
        extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
        issuer: IssuedCertificate | None = None,
        issuer_name: x509.Name | None = None,
        window: tuple[timedelta, timedelta] = (timedelta(seconds=-3), timedelta(hours=3)),
        key: PrivateKey | None = None,
        hash_alg: hashes.HashAlgorithm | None = SHA384,
        self_signed: bool = False,
    ) -> tuple[bytes, PrivateKey]:
        leaf_key = key or _key(seed)
        ca = issuer or self.instances[0]
        subject = _name(f"{INSTANCES[0]}-enc00000000000000{seed:02d}.us-east-1.aws")
        default = [(x509.BasicConstraints(ca=False, path_length=None), True), (_LEAF_KU, False)]
        cert = certificate(
            subject,
            leaf_key,
            subject if self_signed else (issuer_name or ca.certificate.subject),
            leaf_key if self_signed else ca.key,
            T + window[0],
            T + window[1],
            default if extensions is None else extensions,
            hash_alg=hash_alg,
        )
        return _der(cert), leaf_key

    def _leaf_cases(self) -> Iterator[Case]:
        bc = (x509.BasicConstraints(ca=False, path_length=None), True)
        ku = (_LEAF_KU, False)
        unknown = x509.UnrecognizedExtension(_UNKNOWN, b"\x05\x00")
        policy = x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None)
        names = x509.NameConstraints(
            permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
        )
        leaf_ski = x509.SubjectKeyIdentifier.from_public_key(_key(40).public_key())
        instance_ski = (
            self.instances[0]
            .certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            .value
        )
        eku_server = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        eku_client = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        cert_policies = x509.CertificatePolicies(
            [x509.PolicyInformation(ObjectIdentifier("2.23.140.1.2.1"), None)]
        )
        hour = timedelta(hours=1)
        variants: dict[str, dict[str, Any]] = {
            "aws-like": {},
            "unknown-critical": {"extensions": [bc, ku, (unknown, True)]},
            "unknown-noncritical": {"extensions": [bc, ku, (unknown, False)]},
            "policy-constraints-critical": {"extensions": [bc, ku, (policy, True)]},
            "policy-constraints": {"extensions": [bc, ku, (policy, False)]},
            "inhibit-any-policy-critical": {
                "extensions": [bc, ku, (x509.InhibitAnyPolicy(0), True)]
            },
            "name-constraints-critical": {"extensions": [bc, ku, (names, True)]},
            "certificate-policies-critical": {"extensions": [bc, ku, (cert_policies, True)]},
            "eku-server-critical": {"extensions": [bc, ku, (eku_server, True)]},
            "eku-client": {"extensions": [bc, ku, (eku_client, False)]},
            "san": {
                "extensions": [
                    bc,
                    ku,
                    (x509.SubjectAlternativeName([x509.DNSName("enclave.test")]), False),
                ]
            },
            "san-critical-empty-subject": {
                "extensions": [
                    bc,
                    ku,
                    (x509.SubjectAlternativeName([x509.DNSName("enclave.test")]), True),
                ]
            },
            "ski": {"extensions": [bc, ku, (leaf_ski, False)]},
            "aki-match": {
                "extensions": [
                    bc,
                    ku,
                    (
                        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                            instance_ski
                        ),
                        False,
                    ),
                ]
            },
            "aki-mismatch": {
                "extensions": [
                    bc,
                    ku,
                    (x509.AuthorityKeyIdentifier(b"\x01" * 20, None, None), False),
                ]
            },
            "no-basic-constraints": {"extensions": [ku]},
            "ca-true": {
                "extensions": [(x509.BasicConstraints(ca=True, path_length=None), True), ku]
            },
            "bc-noncritical": {
                "extensions": [(x509.BasicConstraints(ca=False, path_length=None), False), ku]
            },
            "no-key-usage": {"extensions": [bc]},
            "no-digital-signature": {
                "extensions": [
                    bc,
                    (
                        x509.KeyUsage(False, True, False, False, False, False, False, False, False),
                        False,
                    ),
                ]
            },
            "key-usage-critical": {"extensions": [bc, (_LEAF_KU, True)]},
            "key-cert-sign": {
                "extensions": [
                    bc,
                    (
                        x509.KeyUsage(True, False, False, False, False, True, False, False, False),
                        True,
                    ),
                ]
            },
            "no-extensions": {"extensions": []},
            "expired": {"window": (-5 * hour, -2 * hour)},
            "not-yet-valid": {"window": (hour, 4 * hour)},
            "short-window": {"window": (-timedelta(minutes=1), hour)},
            "long-window": {"window": (-timedelta(days=1), timedelta(days=30))},
            "under-zonal": {"issuer": self.zonal},
            "under-regional": {"issuer": self.regional},
            "under-root": {"issuer": self.root},
            "under-other-instance": {"issuer": self.instances[1]},
            "under-foreign-instance": {"issuer": self.foreign._instances[INSTANCES[0]]},
            "self-signed": {"self_signed": True},
            "issuer-name-of-zonal": {"issuer_name": self.zonal.certificate.subject},
            "sha256": {"hash_alg": hashes.SHA256()},
            "sha512": {"hash_alg": hashes.SHA512()},
            "p256-key": {"key": _key(41, ec.SECP256R1())},
            "p521-key": {"key": _key(42, ec.SECP521R1())},
            "ed25519-key": {"key": ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))},
        }
        a = self.creds[0]
        bundle = list(a.cabundle)
        other_bundle = list(self.creds[2].cabundle)
        foreign_root = self.foreign.root.der
        for seed, (label, options) in enumerate(variants.items(), start=10):
            leaf, key = self._leaf(seed, **options)
            for bundle_label, cabundle in (
                ("bundle", bundle),
                ("other-bundle", other_bundle),
                ("bundle+foreign", [*bundle, foreign_root]),
            ):
                yield Case(
                    f"leaf/{label}/{bundle_label}",
                    self.document(a, key=key, certificate=leaf, cabundle=cabundle),
                )
            yield Case(
                f"leaf/{label}/bundle/nonce",
                self.document(a, key=key, certificate=leaf, nonce=b"\x01" * 20, indefinite=False),
            )
            yield Case(
                f"leaf/{label}/bundle/foreign-key",
                self.document(a, key=_key(99), certificate=leaf),
            )

    def _ca_cases(self) -> Iterator[Case]:
        a = self.creds[0]
        root, regional, zonal, instance = a.cabundle
        day = timedelta(days=1)
        bc0 = (x509.BasicConstraints(ca=True, path_length=0), True)
        ku = (_CA_KU, True)
        zonal_ski = self.zonal.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(zonal_ski), False)
        decoy = x509.UnrecognizedExtension(
            ObjectIdentifier("1.3.6.1.4.1.55555.14.10"), _P384_SPKI_PREFIX + bytes(96)
        )
        variants: dict[str, dict[str, Any]] = {
            "aws-like": {},
            "ca-false": {
                "extensions": [(x509.BasicConstraints(ca=False, path_length=None), True), ku]
            },
            "no-basic-constraints": {"extensions": [ku, aki]},
            "bc-noncritical": {
                "extensions": [(x509.BasicConstraints(ca=True, path_length=0), False), ku, aki]
            },
            "pathlen-none": {
                "extensions": [(x509.BasicConstraints(ca=True, path_length=None), True), ku, aki]
            },
            "no-key-cert-sign": {
                "extensions": [
                    bc0,
                    (
                        x509.KeyUsage(True, False, False, False, False, False, True, False, False),
                        True,
                    ),
                    aki,
                ]
            },
            "no-key-usage": {"extensions": [bc0, aki]},
            "key-usage-noncritical": {"extensions": [bc0, (_CA_KU, False), aki]},
            "name-constraints": {
                "extensions": [
                    bc0,
                    ku,
                    aki,
                    (
                        x509.NameConstraints(
                            permitted_subtrees=[x509.DNSName("aws")], excluded_subtrees=None
                        ),
                        True,
                    ),
                ]
            },
            "policy-constraints": {
                "extensions": [
                    bc0,
                    ku,
                    aki,
                    (
                        x509.PolicyConstraints(
                            require_explicit_policy=0, inhibit_policy_mapping=None
                        ),
                        True,
                    ),
                ]
            },
            "inhibit-any-policy": {"extensions": [bc0, ku, aki, (x509.InhibitAnyPolicy(0), True)]},
            "unknown-critical": {
                "extensions": [
                    bc0,
                    ku,
                    aki,
                    (x509.UnrecognizedExtension(_UNKNOWN, b"\x05\x00"), True),
                ]
            },
            "eku-server": {
                "extensions": [
                    bc0,
                    ku,
                    aki,
                    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                ]
            },
            "p256-key": {"key": _key(61, ec.SECP256R1())},
            "p256-key-p384-decoy": {"key": _key(62, ec.SECP256R1()), "decoy": decoy},
            "p521-key": {"key": _key(63, ec.SECP521R1())},
            "sha256": {"hash_alg": hashes.SHA256()},
            "expired": {"window": (-3 * day, -day)},
            "short-window": {"window": (-timedelta(hours=1), timedelta(hours=1))},
            "not-yet-valid": {"window": (timedelta(hours=2), 2 * day)},
            "same-key-as-instance": {"key": self.instances[0].key},
        }
        for seed, (label, options) in enumerate(variants.items(), start=60):
            ca_key = options.get("key") or _key(seed)
            window = options.get("window", (-timedelta(minutes=2), day))
            extensions = options.get("extensions", [bc0, ku, aki])
            if "decoy" in options:
                extensions = [*extensions, (options["decoy"], False)]
            ca = certificate(
                _name(f"crafted-{label}.us-east-1.aws.nitro-enclaves"),
                ca_key,
                self.zonal.certificate.subject,
                self.zonal.key,
                T + window[0],
                T + window[1],
                extensions,
                hash_alg=options.get("hash_alg", hashes.SHA384()),
            )
            crafted = IssuedCertificate(ca, _der(ca), ca_key)
            leaf, key = self._leaf(seed, issuer=crafted)
            for bundle_label, cabundle in (
                ("replacing-instance", [root, regional, zonal, crafted.der]),
                ("beside-instance", [root, regional, zonal, instance, crafted.der]),
            ):
                yield Case(
                    f"ca/{label}/{bundle_label}",
                    self.document(a, key=key, certificate=leaf, cabundle=cabundle),
                )
            yield Case(
                f"ca/{label}/genuine-leaf",
                self.document(a, cabundle=[root, regional, zonal, crafted.der]),
            )
        # A CA below a pathLen-0 instance: one level too deep.
        deep_key = _key(90)
        deep = certificate(
            _name("too-deep.us-east-1.aws.nitro-enclaves"),
            deep_key,
            self.instances[0].certificate.subject,
            self.instances[0].key,
            T - timedelta(minutes=2),
            T + day,
            [bc0, ku],
        )
        deep_ca = IssuedCertificate(deep, _der(deep), deep_key)
        leaf, key = self._leaf(91, issuer=deep_ca)
        yield Case(
            "ca/below-pathlen-0",
            self.document(a, key=key, certificate=leaf, cabundle=[*a.cabundle, deep_ca.der]),
        )
        # An impostor: the instance's name, another key.
        impostor = certificate(
            self.instances[0].certificate.subject,
            _key(92),
            self.zonal.certificate.subject,
            self.zonal.key,
            T - timedelta(minutes=2),
            T + day,
            [bc0, ku, aki],
        )
        foreign = self.foreign_creds
        other = self.creds[2].cabundle[-1]
        arrangements: dict[str, list[bytes]] = {
            "impostor-first": [root, regional, zonal, _der(impostor), instance],
            "impostor-last": [root, regional, zonal, instance, _der(impostor)],
            "impostor-only": [root, regional, zonal, _der(impostor)],
            "both-instances": [root, regional, zonal, instance, other],
            "both-instances-other-first": [root, regional, zonal, other, instance],
            "zonal-regional-swapped": [root, zonal, regional, instance],
            "instance-first": [root, instance, zonal, regional],
            "root-second": [regional, root, zonal, instance],
            "regional-twice": [root, regional, regional, zonal, instance],
            "all-ten": [root, regional, zonal, instance, other, _der(impostor), *foreign.cabundle],
            "foreign-intermediates": [root, *foreign.cabundle[1:]],
            "foreign-chain": list(foreign.cabundle),
            "foreign-root-first": [foreign.cabundle[0], regional, zonal, instance],
            "leaf-in-bundle": [root, regional, zonal, instance, a.certificate],
        }
        for label, cabundle in arrangements.items():
            for i, creds in enumerate(self.creds):
                yield Case(f"ca/{label}/leaf{i}", self.document(creds, cabundle=cabundle))
        yield Case("ca/foreign-document", self.document(foreign))
        yield Case(
            "ca/foreign-leaf-genuine-bundle",
            self.document(foreign, cabundle=list(a.cabundle)),
        )

    def _envelope_cases(self) -> Iterator[Case]:
        for i, creds in enumerate(self.creds):
            payload = encode_map(self.fields(creds), indefinite=True)
            good = sign(payload, creds.key)
            flipped = bytes([good[0] ^ 0x80]) + good[1:]

            def signed(protected: bytes, key: Any = creds.key, p: bytes = payload) -> bytes:
                return envelope(protected, p, sign(p, key, protected))

            variants: dict[str, bytes] = {
                "untagged": envelope(PROTECTED, payload, good),
                "tag-18": envelope(PROTECTED, payload, good, tag=18),
                "tag-98": envelope(PROTECTED, payload, good, tag=98),
                "tag-18-twice": cbor2.dumps(
                    cbor2.CBORTag(18, cbor2.CBORTag(18, [PROTECTED, {}, payload, good]))
                ),
                "protected-es256": signed(b"\xa1\x01\x26"),
                "protected-extra-entry": signed(b"\xa2\x01\x38\x22\x04\x41\x00"),
                "protected-empty-bytes": signed(b""),
                "protected-empty-map": signed(b"\xa0"),
                "protected-non-minimal-alg": signed(b"\xa1\x01\x39\x00\x22"),
                "protected-key-true": signed(b"\xa1\xf5\x38\x22"),
                "protected-key-float": signed(b"\xa1\xf9\x3c\x00\x38\x22"),
                "protected-text-key": signed(b"\xa1\x61\x31\x38\x22"),
                "protected-trailing": signed(PROTECTED + b"\x00"),
                "unprotected-alg": cbor2.dumps([PROTECTED, {1: -35}, payload, good]),
                "unprotected-kid": cbor2.dumps([PROTECTED, {4: b"kid"}, payload, good]),
                "unprotected-array": cbor2.dumps([PROTECTED, [], payload, good]),
                "signature-95": envelope(PROTECTED, payload, good[:95]),
                "signature-97": envelope(PROTECTED, payload, good + b"\x00"),
                "signature-bit-flip": envelope(PROTECTED, payload, flipped),
                "signature-zero": envelope(PROTECTED, payload, bytes(96)),
                "signature-other-key": envelope(PROTECTED, payload, sign(payload, _key(5))),
                "signature-other-leaf": envelope(
                    PROTECTED, payload, sign(payload, self.creds[(i + 1) % 3].key)
                ),
                "signature-text": cbor2.dumps([PROTECTED, {}, payload, good.hex()]),
                "trailing-byte": envelope(PROTECTED, payload, good) + b"\x00",
                "array-of-3": cbor2.dumps([PROTECTED, {}, payload]),
                "array-of-5": cbor2.dumps([PROTECTED, {}, payload, good, b""]),
                "map": cbor2.dumps({"payload": payload}),
                "payload-text": cbor2.dumps([PROTECTED, {}, payload.hex(), good]),
                "payload-null": cbor2.dumps([PROTECTED, {}, None, good]),
                "indefinite-array": b"\x9f"
                + b"".join(map(cbor2.dumps, (PROTECTED, {}, payload, good)))
                + b"\xff",
                "empty": b"",
            }
            for label, raw in variants.items():
                yield Case(f"envelope/leaf{i}/{label}", raw)

    def _cbor_cases(self) -> Iterator[Case]:
        for i, creds in enumerate(self.creds):
            items = self.fields(creds)
            pcrs = _pcrs()
            chunks = creds.certificate
            encodings: dict[str, bytes] = {
                "reversed-keys": encode_map(items[::-1], indefinite=False),
                "duplicate-module-id": encode_map(
                    [*items, ("module_id", self._module_id(creds))], indefinite=True
                ),
                "duplicate-pcr-index": encode_map(
                    [
                        (k, Raw(b"\xa2\x00\x58\x30" + bytes(48) + b"\x00\x58\x30" + bytes(48)))
                        if k == "pcrs"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "pcrs-indefinite": encode_map(
                    [
                        (k, Raw(encode_map(list(pcrs.items()), indefinite=True)))
                        if k == "pcrs"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "pcr-index-non-minimal": encode_map(
                    [
                        (k, Raw(b"\xa1\x18\x00\x58\x30" + bytes(48))) if k == "pcrs" else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "cabundle-indefinite": encode_map(
                    [
                        (k, Raw(b"\x9f" + b"".join(cbor2.dumps(c) for c in v) + b"\xff"))
                        if k == "cabundle"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "certificate-chunked": encode_map(
                    [
                        (
                            k,
                            Raw(
                                b"\x5f"
                                + cbor2.dumps(chunks[:100])
                                + cbor2.dumps(chunks[100:])
                                + b"\xff"
                            ),
                        )
                        if k == "certificate"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "module-id-chunked": encode_map(
                    [
                        (k, Raw(b"\x7f" + cbor2.dumps(v[:4]) + cbor2.dumps(v[4:]) + b"\xff"))
                        if k == "module_id"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "key-chunked": encode_map(
                    [
                        (Raw(b"\x7f" + cbor2.dumps("dig") + cbor2.dumps("est") + b"\xff"), v)
                        if k == "digest"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "timestamp-tag-1": encode_map(
                    [
                        (k, Raw(b"\xc1" + v.encoded)) if k == "timestamp" else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "timestamp-bignum": encode_map(
                    [
                        (k, Raw(b"\xc2" + cbor2.dumps(v.encoded[1:])))
                        if k == "timestamp"
                        else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "nonce-tagged": encode_map(
                    [
                        (k, Raw(b"\xd8\x40" + cbor2.dumps(b"\x01" * 8))) if k == "nonce" else (k, v)
                        for k, v in items
                    ],
                    indefinite=True,
                ),
                "trailing-byte": encode_map(items, indefinite=True) + b"\x00",
                "definite-count-too-high": b"\xaa" + encode_map(items, indefinite=False)[1:],
                "break-missing": encode_map(items, indefinite=True)[:-1],
                "deep-extra": encode_map(
                    [*items, ("extra", Raw(b"\x81" * 200 + b"\x00"))], indefinite=True
                ),
            }
            for label, payload in encodings.items():
                yield Case(
                    f"cbor/leaf{i}/{label}", envelope(PROTECTED, payload, sign(payload, creds.key))
                )


@functools.cache
def corpus() -> Corpus:
    """One corpus per test session (building it signs about a thousand documents)."""
    return Corpus()
