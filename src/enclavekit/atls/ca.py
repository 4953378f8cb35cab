"""Issuance logic of the attestation CA: challenges, evidence, policy, certificates, CRL.

Pure with respect to I/O it does not own: time comes from an injected ``clock``, persistence from a
:class:`~enclavekit.atls.store.Store`, and document verification from an
:class:`EvidenceVerifier` (in production :class:`NitroEvidenceVerifier`, over
:class:`enclavekit.attestation.verifier.Verifier`).

Issuance steps (:meth:`Issuer.issue`), cheapest first, each refusal recorded in the audit log:

1. look up the requested service in the CA policy (unknown service: refused, naming neither the
   requested nor the configured services);
2. decode the document without verifying it and check the shape of its cabundle
   (:func:`check_cabundle_shape`: at most :data:`~.limits.MAX_CABUNDLE` certificates, the first a
   pinned root, each issued by the one before it, distinct names and keys), so a crafted bundle
   cannot make path building expensive;
3. its ``nonce`` must be a live, unused challenge (one indexed ``SELECT``; not yet consumed);
4. parse the CSR (PKCS#10) and check its self-signature (proof of possession of the key);
5. verify the attestation document cryptographically against the configured roots at ``clock()``;
6. check the key binding: the document's ``public_key`` equals the CSR's DER SubjectPublicKeyInfo;
7. check the service policy: PCR allowlist, debug enclaves refused;
8. sign a short-lived certificate for the service's DNS names, chained to the CA root, with the
   document in the non-critical extension of :mod:`.extension`;
9. in one store transaction, consume the nonce as a challenge (unknown, expired, reused: refused,
   and the signed certificate is discarded unsent) and record the certificate and its ``issued``
   event. Of racing requests for one challenge — threads, worker processes or replicas — exactly one
   gets a certificate, and a certificate is returned only once it is recorded.

Challenges are capped per client and in total (:class:`~.limits.CaLimits`); expired challenges,
old audit events and long-expired certificate records are deleted as the CA runs.

Not checked here: ``user_data`` (free for the enclave's own use) and anything about the TLS
connection the request arrived on.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclavekit._fs import write_atomic
from enclavekit.atls.extension import attestation_extension
from enclavekit.atls.limits import MAX_CABUNDLE, CaLimits, LimitExceeded
from enclavekit.atls.store import (
    CertificateRecord,
    ChallengeAdmission,
    ConsumeResult,
    Event,
    PruneCounts,
    Store,
)
from enclavekit.attestation.document import AttestationDocument
from enclavekit.attestation.policy import MaxAge, parse_pcr_index
from enclavekit.attestation.verifier import Verifier
from enclavekit.errors import (
    Error,
    Failure,
    MalformedInput,
    PolicyViolation,
    UsageError,
    VerificationError,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

#: Challenge nonce length: 32 bytes (fits the NSM's nonce field with room to spare).
NONCE_LENGTH = 32
#: A CSR larger than this is not a CSR for one EC/RSA key.
MAX_CSR_SIZE = 16 * 1024
#: Backdating of notBefore, to absorb small clock differences between CA and clients.
CLOCK_SKEW = timedelta(seconds=60)
#: Ceiling on certificate lifetimes a policy may ask for: attested certificates are short-lived.
MAX_CERT_VALIDITY = timedelta(days=7)

CA_KEY_FILE = "ca-key.pem"
CA_ROOT_FILE = "ca-root.pem"
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret


def utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------- evidence


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the CA uses from a cryptographically verified attestation document."""

    module_id: str
    timestamp: datetime
    pcrs: Mapping[int, bytes]
    public_key: bytes | None
    nonce: bytes | None
    user_data: bytes | None
    is_debug: bool


class EvidenceVerifier(Protocol):
    """Verifies signature, chain and validity of a raw document at ``at``; raises on failure."""

    def precheck(self, document: bytes) -> bytes | None:
        """Cheap checks before :meth:`verify` (no signature, no path building): decode the document,
        refuse shapes a genuine one never has; return its (unverified) nonce."""
        ...

    def verify(self, document: bytes, *, at: datetime) -> Evidence: ...


def check_cabundle_shape(
    doc: AttestationDocument, pinned_roots: Collection[bytes], *, max_length: int = MAX_CABUNDLE
) -> None:
    """Refuse a cabundle the NSM never sends, before any signature is checked.

    The NSM sends ``[root, intermediate, …]`` with each certificate issued by the one before it and
    the leaf issued by the last (AWS: root + 3 intermediates). Required here: 1..``max_length``
    certificates, ``cabundle[0]`` byte-identical to a pinned root, that issuer/subject chaining, and
    distinct subject names and keys across the bundle and the leaf. With those, RFC 5280 path
    building has exactly one candidate issuer per step (at most ``max_length`` signature checks).

    Only refuses, never accepts: the document still goes through full verification. Not checked
    here: signatures, validity, extensions (the verifier does that).
    """
    bundle = doc.cabundle
    if not 1 <= len(bundle) <= max_length:
        raise MalformedInput(
            f"cabundle has {len(bundle)} certificates; expected 1..{max_length} (a pinned root and"
            f" up to {max_length - 1} intermediates, as the NSM sends them)"
        )
    if bundle[0] not in pinned_roots:
        raise VerificationError(
            "cabundle[0] is not a pinned trust root; the document was not issued by the PKI this CA"
            " trusts"
        )
    names = [
        "the certificate" if i == len(bundle) else f"cabundle[{i}]" for i in range(len(bundle) + 1)
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the verifier decides on pyca's deprecation warnings
            certs = [x509.load_der_x509_certificate(d) for d in (*bundle, doc.certificate)]
            subjects = [c.subject for c in certs]
            issuers = [c.issuer for c in certs]
            keys = [spki_der(c.public_key()) for c in certs]
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedInput(f"cabundle: a certificate cannot be decoded ({exc})") from None
    problem = None
    if len(set(subjects)) != len(certs):
        problem = "two certificates with the same subject name"
    elif len(set(keys)) != len(certs):
        problem = "two certificates with the same public key"
    else:
        for i in range(1, len(certs)):
            if issuers[i] != subjects[i - 1]:
                problem = f"{names[i]} is not issued by {names[i - 1]}"
                break
    if problem is not None:
        raise MalformedInput(
            f"cabundle is not a chain as the NSM sends it ({problem}); expected the root first,"
            " each certificate issued by the one before it, the document's certificate by the last,"
            " and distinct names and keys"
        )


#: (cabundle, leaf) pairs whose shape check passed, remembered per verifier (one enclave fleet
#: uses a handful: the bundle changes with AWS's intermediates, the leaf every few hours).
_SHAPE_CACHE_SIZE = 256


class NitroEvidenceVerifier:
    """:class:`EvidenceVerifier` over :class:`enclavekit.attestation.Verifier` (signature, chain, age).

    ``max_age`` bounds how old the document may be at issuance (it must also carry a live challenge
    nonce, so this is a second, clock-based bound).
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        max_age: timedelta = timedelta(minutes=5),
        max_cabundle: int = MAX_CABUNDLE,
    ) -> None:
        self.verifier = verifier
        self._policy = MaxAge(max_age)
        self.max_cabundle = max_cabundle
        self._roots = frozenset(
            r.public_bytes(serialization.Encoding.DER) for r in verifier.trust_roots
        )
        self._shapes_lock = threading.Lock()
        self._shapes_passed: OrderedDict[bytes, None] = OrderedDict()

    def precheck(self, document: bytes) -> bytes | None:
        doc = AttestationDocument.from_cbor(document)
        # The shape check is a pure function of the bundle, the leaf and this verifier's fixed
        # roots and bound: a (bundle, leaf) that passed once passes again, so only passes are
        # remembered (by SHA-256 of the exact bytes), in a small LRU table.
        key = hashlib.sha256(
            b"".join(len(c).to_bytes(4, "big") + c for c in (*doc.cabundle, doc.certificate))
        ).digest()
        with self._shapes_lock:
            known = key in self._shapes_passed
            if known:
                self._shapes_passed.move_to_end(key)
        if not known:
            check_cabundle_shape(doc, self._roots, max_length=self.max_cabundle)
            with self._shapes_lock:
                self._shapes_passed[key] = None
                while len(self._shapes_passed) > _SHAPE_CACHE_SIZE:
                    self._shapes_passed.popitem(last=False)
        return doc.nonce

    def verify(self, document: bytes, *, at: datetime) -> Evidence:
        verified = self.verifier.verify(document, self._policy, at=at)
        return Evidence(
            module_id=verified.module_id,
            timestamp=verified.timestamp,
            pcrs=verified.pcrs,
            public_key=verified.public_key,
            nonce=verified.nonce,
            user_data=verified.user_data,
            is_debug=verified.is_debug,
        )


# ------------------------------------------------------------------------------------------ policy


#: Certificate usages a service may have (``usage:`` in the CA policy).
USAGES = frozenset({"server", "client"})


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Which enclaves may obtain a certificate for one service, and what the certificate says."""

    name: str
    dns_names: tuple[str, ...]
    pcr_allowlist: tuple[Mapping[int, bytes], ...]
    validity: timedelta = timedelta(hours=1)
    unsafe_allow_debug: bool = False
    #: IP addresses for the SAN as well (clients connecting by address); DNS names are required.
    ip_addresses: tuple[str, ...] = ()
    #: ``server`` (EKU serverAuth, DNS names required) or ``client`` (EKU clientAuth, for mutual
    #: attested TLS; names optional).
    usage: str = "server"

    def __post_init__(self) -> None:
        if self.usage not in USAGES:
            raise ValueError(
                f"service {self.name!r}: usage must be one of {sorted(USAGES)}, found {self.usage!r}"
            )
        if not self.dns_names and self.usage == "server":
            raise ValueError(f"service {self.name!r}: dns_names must not be empty")
        for address in self.ip_addresses:
            ipaddress.ip_address(address)  # ValueError for a bad address
        if not self.pcr_allowlist or any(not entry for entry in self.pcr_allowlist):
            raise ValueError(
                f"service {self.name!r}: pcrs must list at least one non-empty set of PCR values"
            )
        if not timedelta(seconds=1) <= self.validity <= MAX_CERT_VALIDITY:
            raise ValueError(f"service {self.name!r}: validity must be between 1 s and 7 days")

    def failures(self, evidence: Evidence) -> tuple[Failure, ...]:
        """Every failed check of this policy against ``evidence``."""
        found: list[Failure] = []
        if evidence.is_debug and not self.unsafe_allow_debug:
            found.append(
                Failure("debug", "a production enclave (PCR0 not all zero)", "debug enclave")
            )
        if not any(_pcrs_match(entry, evidence.pcrs) for entry in self.pcr_allowlist):
            for i, entry in enumerate(self.pcr_allowlist):
                for index, want in sorted(entry.items()):
                    got = evidence.pcrs.get(index)
                    if got != want:
                        found.append(
                            Failure(
                                f"pcrs[{i}].PCR{index}",
                                want.hex(),
                                "absent" if got is None else got.hex(),
                            )
                        )
        return tuple(found)


def _pcrs_match(entry: Mapping[int, bytes], pcrs: Mapping[int, bytes]) -> bool:
    return all(pcrs.get(index) == value for index, value in entry.items())


@dataclass(frozen=True, slots=True)
class CaPolicy:
    """The CA's policy: one :class:`ServicePolicy` per service name, plus the challenge lifetime."""

    services: Mapping[str, ServicePolicy]
    challenge_ttl: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if not timedelta(seconds=1) <= self.challenge_ttl <= timedelta(minutes=30):
            raise ValueError("challenge_ttl must be between 1 s and 30 min")


def _pcr_index(key: Any) -> int:
    try:  # ASCII digits only: str.isdigit() accepts "²", which int() then refuses
        return parse_pcr_index(key, "policy")
    except UsageError:
        raise UsageError(f"policy: PCR index must be 0..31 or PCRn, found {key!r}") from None


def _pcr_value(value: Any) -> bytes:
    if not isinstance(value, str):
        raise UsageError(f"policy: PCR value must be a hex string, found {type(value).__name__}")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise UsageError(f"policy: PCR value is not hex: {value[:20]!r}…") from exc
    if len(raw) not in (32, 48, 64):
        raise UsageError(f"policy: PCR value must be 32, 48 or 64 bytes, found {len(raw)}")
    return raw


_POLICY_KEYS = frozenset({"services", "challenge_ttl_seconds"})
_SERVICE_KEYS = frozenset(
    {
        "dns_names",
        "ip_addresses",
        "pcrs",
        "certificate_validity_seconds",
        "unsafe_allow_debug",
        "usage",
    }
)


def ca_policy_from_mapping(obj: Any) -> CaPolicy:
    """Build a :class:`CaPolicy` from parsed YAML/JSON (schema: docs/atls.md)."""
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("services"), dict)
        or not obj["services"]
    ):
        raise UsageError("CA policy: expected a mapping with a non-empty 'services' mapping")
    services: dict[str, ServicePolicy] = {}
    unknown = set(obj) - _POLICY_KEYS
    if unknown:
        raise UsageError(f"CA policy: unknown key(s) {sorted(map(str, unknown))}")
    try:
        for name, spec in obj["services"].items():
            if not isinstance(spec, dict):
                raise UsageError(f"CA policy: service {name!r} must be a mapping")
            unknown = set(spec) - _SERVICE_KEYS
            if unknown:
                raise UsageError(
                    f"CA policy: service {name!r}: unknown key(s) {sorted(map(str, unknown))};"
                    f" expected some of {sorted(_SERVICE_KEYS)}"
                )
            debug = spec.get("unsafe_allow_debug", False)
            if not isinstance(debug, bool):
                raise UsageError(
                    f"CA policy: service {name!r}: unsafe_allow_debug must be true/false"
                )
            ips = spec.get("ip_addresses", [])
            if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
                raise UsageError(f"CA policy: service {name!r}: ip_addresses must be a list")
            usage = spec.get("usage", "server")
            dns = spec.get("dns_names", [] if usage == "client" else None)
            pcrs = spec.get("pcrs")
            if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
                raise UsageError(f"CA policy: service {name!r}: dns_names must be a list of names")
            if isinstance(pcrs, dict):
                pcrs = [pcrs.get("Measurements", pcrs)]
            if not isinstance(pcrs, list) or not all(isinstance(p, dict) for p in pcrs):
                raise UsageError(f"CA policy: service {name!r}: pcrs must be a list of mappings")
            allow = tuple(
                {
                    _pcr_index(k): _pcr_value(v)
                    for k, v in entry.items()
                    if str(k) not in ("HashAlgorithm",)
                }
                for entry in (e.get("Measurements", e) for e in pcrs)
            )
            services[str(name)] = ServicePolicy(
                name=str(name),
                dns_names=tuple(dns),
                pcr_allowlist=allow,
                validity=timedelta(seconds=int(spec.get("certificate_validity_seconds", 3600))),
                unsafe_allow_debug=debug,
                ip_addresses=tuple(ips),
                usage=str(usage),
            )
        ttl = timedelta(seconds=int(obj.get("challenge_ttl_seconds", 60)))
        return CaPolicy(services=services, challenge_ttl=ttl)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"CA policy: {exc}") from exc


def load_ca_policy(path: Path) -> CaPolicy:
    """Read a CA policy file (YAML or JSON)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read CA policy {path}: {exc.strerror}") from exc
    try:
        obj = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"CA policy {path} is not valid YAML/JSON: {exc}") from exc
    return ca_policy_from_mapping(obj)


# ---------------------------------------------------------------------------------------- CA state


@dataclass(frozen=True, slots=True)
class CaKeys:
    """The CA's root certificate and its private key."""

    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)


def create_ca_keys(common_name: str = "enclavekit attestation CA", *, now: datetime) -> CaKeys:
    """A fresh P-384 key and a self-signed root valid for 10 years."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return CaKeys(root=root, key=key)


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o600, durable=True)


def init_state_dir(
    state_dir: Path, *, common_name: str = "enclavekit attestation CA", clock: Clock = utc_now
) -> CaKeys:
    """Create the CA key, root and admin token in ``state_dir``; refuses to overwrite.

    A new ``state_dir`` is created 0700 (it will hold the database: audit events, challenges and
    every issued document). An existing one keeps its mode; a warning is logged if others can
    enter it.
    """
    if not state_dir.exists():
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            state_dir.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
    elif state_dir.is_dir() and state_dir.stat().st_mode & 0o077:
        log.warning(
            "%s is accessible to other users (mode %o); the CA database will be 0600, but prefer a"
            " directory of its own (chmod 700)",
            state_dir,
            state_dir.stat().st_mode & 0o777,
        )
    if (state_dir / CA_KEY_FILE).exists():
        raise UsageError(
            f"{state_dir / CA_KEY_FILE} already exists; refusing to replace a CA key"
            " (use another --state-dir)"
        )
    keys = create_ca_keys(common_name, now=clock())
    key_pem = keys.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(state_dir / ADMIN_TOKEN_FILE, secrets.token_hex(32).encode() + b"\n")
    _write_private(state_dir / CA_ROOT_FILE, keys.root_pem)
    _write_private(state_dir / CA_KEY_FILE, key_pem)
    os.chmod(state_dir / CA_ROOT_FILE, 0o644)
    return keys


def load_ca_keys(state_dir: Path) -> CaKeys:
    """Load the CA key and root from ``state_dir`` (created by :func:`init_state_dir`)."""
    try:
        key_pem = (state_dir / CA_KEY_FILE).read_bytes()
        root_pem = (state_dir / CA_ROOT_FILE).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"no CA in {state_dir} ({exc.strerror});"
            f" run `enclavekit ca init --state-dir {state_dir}`"
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        root = x509.load_pem_x509_certificate(root_pem)
    except ValueError as exc:
        raise MalformedInput(f"CA state in {state_dir} is damaged: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or root.public_key() != key.public_key():
        raise MalformedInput(
            f"CA state in {state_dir}: the key does not belong to the root certificate"
        )
    return CaKeys(root=root, key=key)


def load_admin_token(state_dir: Path) -> str | None:
    try:
        return (state_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- issuance


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    record: CertificateRecord
    certificate: x509.Certificate
    root: x509.Certificate

    @property
    def chain_pem(self) -> bytes:
        """Leaf then root, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM) + _root_pem(self.root)


@functools.lru_cache(maxsize=8)
def _root_pem(root: x509.Certificate) -> bytes:
    return root.public_bytes(serialization.Encoding.PEM)


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request (PEM or DER) whose self-signature verifies."""
    if len(data) > MAX_CSR_SIZE:
        raise MalformedInput(f"CSR is {len(data)} bytes; expected at most {MAX_CSR_SIZE}")
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_csr(data)
        )
    except ValueError as exc:
        raise MalformedInput(
            f"CSR: expected a PKCS#10 request (PEM or DER), found undecodable data: {exc}"
        ) from exc
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, InvalidSignature, ValueError) as exc:
        raise MalformedInput(f"CSR: signature cannot be checked: {exc}") from exc
    if not valid:
        raise VerificationError(
            "CSR: self-signature does not verify; expected proof of key possession"
        )
    return csr


def end_entity_builder(
    keys: CaKeys,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    now: datetime,
    not_after: datetime,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
) -> x509.CertificateBuilder:
    """The profile of every end-entity certificate the CA root signs: CA:FALSE and digitalSignature
    (critical), one EKU, key identifiers, the SANs if any. Callers add their own extensions and sign."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(keys.root.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(keys.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder


class Issuer:
    """The attestation CA. Thread-safe as long as the store is."""

    def __init__(
        self,
        keys: CaKeys,
        policy: CaPolicy,
        store: Store,
        verifier: EvidenceVerifier,
        *,
        clock: Clock = utc_now,
        limits: CaLimits | None = None,
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.store = store
        self.verifier = verifier
        self.clock = clock
        self.limits = limits if limits is not None else CaLimits()
        self._prune_lock = threading.Lock()
        self._last_prune: datetime | None = None

    def prune(self, now: datetime | None = None) -> PruneCounts:
        """Delete expired challenges, old audit events and long-expired certificate records."""
        return prune_store(self.store, self.limits, at=now if now is not None else self.clock())

    def _maybe_prune(self, now: datetime) -> None:
        with self._prune_lock:
            last = self._last_prune
            if last is not None and last <= now < last + self.limits.prune_interval:
                return
            self._last_prune = now
        self.prune(now)

    # 1 -- challenges
    def new_challenge(self, client: str = "local") -> Challenge:
        """A single-use nonce for ``client`` (its address); :class:`LimitExceeded` over the caps."""
        now = self.clock()
        self._maybe_prune(now)
        challenge = Challenge(secrets.token_bytes(NONCE_LENGTH), now + self.policy.challenge_ttl)
        admission = self.store.add_challenge(
            challenge.nonce,
            now,
            challenge.expires_at,
            client=client,
            max_live=self.limits.max_live_challenges,
            max_live_per_client=self.limits.max_live_challenges_per_client,
        )
        if admission is not ChallengeAdmission.ADDED:
            ttl = int(self.policy.challenge_ttl.total_seconds())
            raise LimitExceeded(
                f"{admission.value} (limit"
                f" {self.limits.max_live_challenges_per_client if admission is ChallengeAdmission.TOO_MANY_FOR_CLIENT else self.limits.max_live_challenges});"
                f" use the challenges you have, or retry when they expire (lifetime {ttl} s)",
                retry_after=ttl,
            )
        return challenge

    # 2 -- issuance
    def issue(self, service: str, csr_data: bytes, document: bytes) -> IssuedCertificate:
        """Issue a certificate, or raise MalformedInput, VerificationError or PolicyViolation.

        Every outcome is recorded in the store's audit log (an issuance in the same transaction
        as its certificate record and the consumption of its challenge).
        """
        now = self.clock()
        self._maybe_prune(now)
        try:
            issued = self._issue(service, csr_data, document, now)
        except (MalformedInput, VerificationError, PolicyViolation, UsageError) as exc:
            self._notify(exc)
            self.store.record_event(
                Event(now, "refused", service[:200], None, exc.diagnostics()[:2000])
            )
            log.info(
                "refused certificate for %r: %s",
                service[:200],
                exc.diagnostics(),
                extra={
                    "event": "refused",
                    "fields": {"service": service[:200], "reason": exc.diagnostics()[:2000]},
                },
            )
            raise
        self._notify(None)
        log.info(
            "issued certificate %x for %r, valid until %s",
            issued.record.serial,
            service,
            issued.record.not_after.isoformat(),
            extra={
                "event": "issued",
                "fields": {
                    "service": service,
                    "serial": format(issued.record.serial, "x"),
                    "not_after": issued.record.not_after.isoformat(),
                },
            },
        )
        return issued

    def _issue(
        self, service: str, csr_data: bytes, document: bytes, now: datetime
    ) -> IssuedCertificate:
        # 1. Known service. The refusal lists no service names: neither the configured ones
        #    (policy is not for unauthenticated clients to enumerate) nor the request's.
        svc = self.policy.services.get(service)
        if svc is None:
            raise PolicyViolation(
                [Failure("service", "a service configured on this CA", "an unknown service name")]
            )
        # 2. The document's shape, unverified (decoding and comparisons only).
        nonce = self.verifier.precheck(document)
        if not nonce:
            raise VerificationError(
                "attestation document has no nonce; expected the nonce of a challenge from"
                " POST /v1/challenges"
            )
        # 3. Its nonce is a live challenge (checked again, atomically, when consumed in 6).
        status = self.store.challenge_status(nonce, now)
        if status is not None:
            raise _not_live(status)
        # 4. CSR and proof of possession.
        csr = parse_csr(csr_data)
        spki = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # 5. The document verifies against the configured roots, now.
        evidence = self.verifier.verify(document, at=now)
        if evidence.nonce != nonce:  # pragma: no cover - one decoder, one document
            raise VerificationError("the verified nonce differs from the decoded one; refusing")
        # 6. Key binding and 7. service policy: report every failure at once.
        failures: list[Failure] = []
        if evidence.public_key != spki:
            failures.append(
                Failure(
                    "public_key",
                    "the CSR's DER SubjectPublicKeyInfo",
                    "absent"
                    if evidence.public_key is None
                    else f"{len(evidence.public_key)} other bytes",
                )
            )
        failures.extend(svc.failures(evidence))
        if failures:
            raise PolicyViolation(failures)
        if svc.unsafe_allow_debug and evidence.is_debug:
            log.warning("issuing to a DEBUG enclave for %r (unsafe_allow_debug)", service)
        # 8. Sign; 9. consume the challenge and record, atomically: of racing requests, one wins.
        cert = self._sign(svc, csr, document, now)
        record = CertificateRecord(
            serial=cert.serial_number,
            service=service,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            certificate_der=cert.public_bytes(serialization.Encoding.DER),
            document=document,
            issued_at=now,
        )
        event = Event(
            now, "issued", service, record.serial, f"not_after={record.not_after.isoformat()}"
        )
        outcome = self.store.record_issuance(nonce, now, record, event)
        if outcome is not ConsumeResult.CONSUMED:
            raise _not_live(outcome)
        return IssuedCertificate(record=record, certificate=cert, root=self.keys.root)

    def _sign(
        self,
        svc: ServicePolicy,
        csr: x509.CertificateSigningRequest,
        document: bytes,
        now: datetime,
    ) -> x509.Certificate:
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise MalformedInput(
                f"CSR key type {type(public_key).__name__} is not supported; expected EC or RSA"
            )
        not_after = min(now + svc.validity, self.keys.root.not_valid_after_utc)
        eku = (
            ExtendedKeyUsageOID.CLIENT_AUTH
            if svc.usage == "client"
            else ExtendedKeyUsageOID.SERVER_AUTH
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in svc.dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in svc.ip_addresses]
        builder = end_entity_builder(
            self.keys, svc.name, public_key, now=now, not_after=not_after, eku=eku, sans=names
        ).add_extension(attestation_extension(document), critical=False)
        return builder.sign(self.keys.key, hashes.SHA384())

    # observers (metrics)
    _observers: tuple[Callable[[Error | None], None], ...] = ()

    def add_observer(self, callback: Callable[[Error | None], None]) -> None:
        """Call ``callback(None)`` after each issuance and ``callback(exc)`` after each refusal."""
        self._observers = (*self._observers, callback)

    def _notify(self, outcome: Error | None) -> None:
        for callback in self._observers:
            try:
                callback(outcome)
            except Exception:  # an observer never changes an issuance's outcome
                log.exception("issuance observer failed")

    # 3 -- lookup, revocation, CRL
    def get(self, serial: int) -> CertificateRecord | None:
        return self.store.get_certificate(serial)

    def revoke(self, serial: int, reason: str = "unspecified") -> bool:
        """Revoke ``serial``; False if unknown or already revoked."""
        return revoke_certificate(self.store, serial, reason, at=self.clock())

    def crl(self, *, next_update: timedelta = timedelta(hours=1)) -> x509.CertificateRevocationList:
        """A CRL of every revoked certificate not yet expired (RFC 5280 §3.3 lets an expired one
        leave the list), signed by the CA key, valid for ``next_update``."""
        now = self.clock()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.keys.root.subject)
            .last_update(now)
            .next_update(now + next_update)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.keys.key.public_key()),
                critical=False,
            )
        )
        for rec in self.store.revocations(valid_at=now):
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(rec.serial)
                .revocation_date(rec.revoked_at)
            )
            flag = _REASONS.get(rec.reason or "unspecified")
            if flag is not None and flag is not x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        return builder.sign(self.keys.key, hashes.SHA384())


def _not_live(outcome: ConsumeResult) -> VerificationError:
    return VerificationError(
        f"the document's nonce is {outcome.value} as a challenge of this CA; expected a fresh,"
        " unused challenge: request a new one (POST /v1/challenges) and attest again"
    )


_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
}


def prune_store(store: Store, limits: CaLimits, *, at: datetime) -> PruneCounts:
    """Apply the retention policy of ``limits`` at ``at``: delete expired challenges (consumed or
    not), audit events older than ``audit_retention`` and beyond the newest ``audit_max_events``,
    and certificate records whose notAfter is more than ``certificate_retention`` past."""
    return store.prune(
        at,
        events_before=at - limits.audit_retention,
        max_events=limits.audit_max_events,
        certificates_expired_before=at - limits.certificate_retention,
    )


def revoke_certificate(store: Store, serial: int, reason: str, *, at: datetime) -> bool:
    """Mark ``serial`` revoked in ``store`` and log it; False if unknown or already revoked."""
    if reason not in _REASONS:
        raise UsageError(f"revocation reason must be one of {sorted(_REASONS)}, found {reason!r}")
    done = store.revoke(serial, at, reason)
    if done:
        store.record_event(Event(at, "revoked", None, serial, reason))
    return done


def spki_der(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a public key object."""
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


__all__: Sequence[str] = (
    "CaKeys",
    "CaPolicy",
    "Challenge",
    "Evidence",
    "EvidenceVerifier",
    "IssuedCertificate",
    "Issuer",
    "NitroEvidenceVerifier",
    "ServicePolicy",
    "ca_policy_from_mapping",
    "check_cabundle_shape",
    "create_ca_keys",
    "init_state_dir",
    "load_ca_keys",
    "load_ca_policy",
    "parse_csr",
    "prune_store",
    "revoke_certificate",
)
