"""Verification of attestation documents against pinned trust roots.

:class:`Verifier` turns raw document bytes into a :class:`VerifiedAttestation`, or raises. Steps (numbered
in :meth:`Verifier._verify_crypto`):

1. Decode strictly (:meth:`AttestationDocument.from_cbor`), then check the document's kind: a NitroTPM
   document (``nitrotpm_pcrs``) is refused with :class:`~enclavekit.errors.NitroTpmDocumentError` unless the
   caller passes ``allow_nitrotpm=True``, and a module id that contradicts the PCR map (``-tpm`` with
   ``pcrs``, ``-enc`` with ``nitrotpm_pcrs``) is always refused (:class:`~enclavekit.errors.DocumentKindError`).
   This runs before, and independently of, the certificate chain.
2. Parse the leaf and the cabundle; every certificate must be EC P-384 signed ecdsa-with-SHA384.
3. The cabundle's own root (``cabundle[0]``) must be byte-identical to a pinned root. It is only *compared*,
   never trusted; the intermediates ``cabundle[1:]`` are offered as untrusted path material, never as anchors.
4. RFC 5280 path validation from the leaf to a pinned root at the injected time ``at`` (pyca/cryptography,
   web-PKI CA profile) and the leaf profile (:func:`_path_verifier`, :func:`_check_leaf`: no critical extension
   pyca does not process, CA:FALSE, digitalSignature).
5. The COSE ES384 signature over the exact Sig_structure, with the leaf key; r ‖ s as received, leading zero
   bytes and high-S accepted.
6. A frozen :class:`VerifiedAttestation` is built; then the caller's policy runs on it.

Verified chains are cached per verifier, and the caches may only skip work whose result they provably have
(the full argument is in :meth:`Verifier._validate_chain`): a chain is cached only when its cabundle is exactly
the validated path, root first, with distinct subject encodings, so that pyca's path building over it is a
single walk whose outcome at any instant inside the path's validity window is the cached one. Two levels:

- the full path by (leaf, cabundle), usable at any ``at`` inside the window where every certificate of the path
  is valid: a stream of documents from one enclave costs one ECDSA verification each;
- the CA path by cabundle alone: a new leaf under a cached cabundle is validated by the *same* pyca validator
  and leaf profile as a cold one, with the cabundle's last CA as the only anchor (its signature on the leaf,
  the leaf's validity, extensions and profile; the CA's own checks at the same depth). If that does not
  accept the leaf, the document gets full path validation, so every refusal is a cold verifier's refusal.

Not checked: revocation (AWS prescribes none), freshness or nonce (policies do that), and the meaning of
``public_key``/``user_data``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification as pkix
from cryptography.x509.oid import SignatureAlgorithmOID

from enclavekit.attestation.document import AttestationDocument, DocumentKind
from enclavekit.errors import (
    DocumentKindError,
    Error,
    MalformedInput,
    NitroTpmDocumentError,
    PolicyViolation,
    VerificationError,
)
from enclavekit.pki.roots import aws_root, fingerprint

if TYPE_CHECKING:
    from enclavekit.attestation.policy import Policy

logger = logging.getLogger(__name__)

#: Bounded so a flood of distinct chains cannot grow memory without limit.
CHAIN_CACHE_SIZE = 1024
#: Real chains have 3 intermediates; Sui caps the chain at 10 certificates.
MAX_CHAIN_DEPTH = 8
#: pyca's path building gives up after this many signature checks (``Budget::DEFAULT_SIGNATURE_CHECK_LIMIT``
#: in cryptography-x509-verification); a chain is cached only when its path building provably stays below it.
PYCA_SIGNATURE_BUDGET = 128

_CONSTRUCT = object()  # only this module can build a VerifiedAttestation
#: The COSE ES384 signature algorithm (immutable; built once, its constructor imports on every call).
_ES384 = ec.ECDSA(hashes.SHA384())


@dataclass(frozen=True, slots=True)
class VerifiedAttestation:
    """An attestation document whose signature and chain were verified. Only :class:`Verifier` makes one."""

    module_id: str
    timestamp: datetime
    #: Enclave PCRs; empty for a NitroTPM document (whose PCRs are in :attr:`nitrotpm_pcrs`).
    pcrs: Mapping[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    certificate: x509.Certificate
    is_debug: bool
    is_nitrotpm: bool
    #: The instant at which the chain was validated (the injected ``at``).
    verified_at: datetime
    #: The validated path, leaf first, pinned root last.
    chain: tuple[x509.Certificate, ...]
    document: AttestationDocument
    raw: bytes = field(repr=False)
    kind: DocumentKind = DocumentKind.ENCLAVE
    #: NitroTPM PCRs (only when verified with ``allow_nitrotpm=True``); empty for an enclave document.
    nitrotpm_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _CONSTRUCT:
            raise TypeError("VerifiedAttestation is created only by enclavekit's Verifier")

    @property
    def root(self) -> x509.Certificate:
        """The pinned root the chain ends at."""
        return self.chain[-1]


@dataclass(frozen=True, slots=True)
class _CachedChain:
    """A validated path and the window in which every certificate of it is valid."""

    chain: tuple[x509.Certificate, ...]
    not_before: datetime
    not_after: datetime
    #: A full path: the leaf's key (step 5 needs it).
    leaf_key: ec.EllipticCurvePublicKey | None = None
    #: A CA path: a pyca store holding only ``chain[0]``, the CA that issued the path's leaf (kept so that pyca
    #: loads that CA's key once, not once per leaf).
    issuer_store: pkix.Store | None = None
    #: A full path over a simple cabundle (:meth:`Verifier._validate_chain`): the full-path cache may keep it.
    cacheable: bool = False

    @classmethod
    def of_ca_path(cls, chain: tuple[x509.Certificate, ...]) -> _CachedChain:
        return cls(
            chain,
            max(c.not_valid_before_utc for c in chain),
            min(c.not_valid_after_utc for c in chain),
            issuer_store=pkix.Store([chain[0]]),
        )


class _WindowCache:
    """A bounded LRU of validated paths, each usable only inside its validity window."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, _CachedChain] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes, at: datetime) -> _CachedChain | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if at > entry.not_after:
                del self._entries[key]  # expired: re-validate (and fail) from scratch
                return None
            if at < entry.not_before:
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: _CachedChain) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Verifier:
    """Verifies attestation documents against an explicit set of pinned root certificates."""

    def __init__(self, trust_roots: Sequence[x509.Certificate]) -> None:
        roots = tuple(trust_roots)
        if not roots:
            raise ValueError(
                "a Verifier needs at least one trust root (use Verifier.aws() for AWS)"
            )
        for root in roots:
            if not isinstance(root, x509.Certificate):
                raise TypeError(f"trust roots must be x509.Certificate, got {type(root).__name__}")
        self._roots = roots
        root_ders = [r.public_bytes(Encoding.DER) for r in roots]
        self._root_der = set(root_ders)
        self._store = pkix.Store(list(roots))
        self._roots_constrain = any(
            _has_constraints(r, der) for r, der in zip(roots, root_ders, strict=True)
        )
        # Full paths keyed by (leaf, cabundle); CA paths keyed by the cabundle alone.
        self._paths = _WindowCache(CHAIN_CACHE_SIZE)
        self._ca_paths = _WindowCache(CHAIN_CACHE_SIZE)

    @classmethod
    def aws(cls) -> Verifier:
        """A verifier that trusts only the pinned AWS Nitro Enclaves root G1."""
        return cls([aws_root()])

    @property
    def trust_roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    @property
    def trusts_only_aws(self) -> bool:
        return [fingerprint(r) for r in self._roots] == [fingerprint(aws_root())]

    def clear_cache(self) -> None:
        """Forget every cached validated path (the next document pays for full path validation)."""
        self._paths.clear()
        self._ca_paths.clear()

    def verify(
        self,
        raw: bytes,
        policy: Policy,
        *,
        at: datetime | None = None,
        allow_nitrotpm: bool = False,
    ) -> VerifiedAttestation:
        """Verify ``raw`` at ``at`` (default: now) and apply ``policy``; raise on any failure.

        Raises :class:`MalformedInput` (undecodable), :class:`VerificationError` (signature, chain, root,
        time; :class:`~enclavekit.errors.NitroTpmDocumentError` for a NitroTPM document unless
        ``allow_nitrotpm``) or :class:`PolicyViolation` (every failed check). Enclave policies are never
        satisfied by a NitroTPM document; check its PCRs with
        :class:`~enclavekit.attestation.policy.NitroTpmPcrsEqual`.
        """
        verified = self.verify_signature_and_chain(raw, at=at, allow_nitrotpm=allow_nitrotpm)
        failures = policy.failures(verified)
        if failures:
            raise PolicyViolation(failures)
        return verified

    def verify_signature_and_chain(
        self, raw: bytes, *, at: datetime | None = None, allow_nitrotpm: bool = False
    ) -> VerifiedAttestation:
        """Steps 1-6 without a policy. Callers must still apply a policy before trusting the result."""
        when = _utc(at) if at is not None else datetime.now(UTC)
        return self._verify_crypto(raw, when, allow_nitrotpm)

    def verify_many(
        self,
        documents: Iterable[bytes],
        policy: Policy,
        *,
        at: datetime | None = None,
        workers: int | None = None,
        allow_nitrotpm: bool = False,
    ) -> list[VerifiedAttestation | Error]:
        """Verify many documents across processes; one result or error per input, in order.

        Signatures and chains are checked in worker processes (each with its own chain cache); the policy is
        applied here. ``workers`` defaults to the number of CPUs. Below :data:`PROCESS_MIN_DOCUMENTS`
        documents (or with one worker) everything is verified in this process, with this verifier's
        cache: there, starting processes costs more than it saves. The verdicts are the same either way.
        """
        docs = [bytes(d) for d in documents]
        when = _utc(at) if at is not None else datetime.now(UTC)
        n = workers or os.cpu_count() or 1
        roots = [r.public_bytes(Encoding.DER) for r in self._roots]
        results: list[VerifiedAttestation | Error] = []
        if n <= 1 or len(docs) < max(2, PROCESS_MIN_DOCUMENTS):
            for raw in docs:  # no worker processes: verify here, with this verifier's cache
                try:
                    results.append(self.verify(raw, policy, at=when, allow_nitrotpm=allow_nitrotpm))
                except Error as exc:
                    results.append(exc)
            return results
        chunk = max(1, len(docs) // (n * 4))
        with ProcessPoolExecutor(n, initializer=_init_worker, initargs=(roots,)) as pool:
            outcomes = list(
                pool.map(
                    _verify_in_worker,
                    docs,
                    [when] * len(docs),
                    [allow_nitrotpm] * len(docs),
                    chunksize=chunk,
                )
            )
        chains: dict[tuple[bytes, ...], tuple[x509.Certificate, ...]] = {}
        for raw, outcome in zip(docs, outcomes, strict=True):
            if outcome[0] != "ok":
                error_class = _WORKER_ERRORS.get(str(outcome[0]), VerificationError)
                results.append(error_class(str(outcome[1])))
                continue
            ders = tuple(d for d in outcome[1:] if isinstance(d, bytes))
            chain = chains.get(ders)
            if chain is None:  # documents of one enclave share a chain: load it once per batch
                chain = chains[ders] = tuple(x509.load_der_x509_certificate(d) for d in ders)
            verified = _result(AttestationDocument.from_cbor(raw), raw, chain, when)
            failures = policy.failures(verified)
            results.append(PolicyViolation(failures) if failures else verified)
        return results

    # -- internals -------------------------------------------------------------------------------

    def _verify_crypto(
        self, raw: bytes, at: datetime, allow_nitrotpm: bool = False
    ) -> VerifiedAttestation:
        # 1. Decode strictly; check the document's kind (before, and independent of, the chain).
        doc = AttestationDocument.from_cbor(raw)
        check_document_kind(doc, allow_nitrotpm=allow_nitrotpm)

        # 2-4. Chain: from the cache when this exact chain was validated for a window containing `at`.
        #      The keys encode (cabundle) and (cabundle, leaf) injectively: every certificate, the leaf too, is
        #      prefixed with its 4-byte length, so no leaf can spill into the cabundle or back.
        bundle_key = hashlib.sha256(b"".join([len(c).to_bytes(4, "big") + c for c in doc.cabundle]))
        path_key = bundle_key.copy()
        path_key.update(len(doc.certificate).to_bytes(4, "big") + doc.certificate)
        cached = self._paths.get(path_key.digest(), at)
        if cached is None:
            try:
                cached = self._validate_chain(doc, at, bundle_key.digest())
            except (ValueError, UnsupportedAlgorithm) as exc:
                # pyca parses certificates lazily: a field can fail to decode long after loading.
                raise MalformedInput(
                    f"a certificate of the document cannot be decoded: {exc}"
                ) from None
            if cached.cacheable:
                self._paths.put(path_key.digest(), cached)
        leaf_key = cached.leaf_key
        assert leaf_key is not None

        # 5. COSE signature over the exact Sig_structure.
        r = int.from_bytes(doc.signature[:48], "big")
        s = int.from_bytes(doc.signature[48:], "big")
        try:
            leaf_key.verify(encode_dss_signature(r, s), doc.sig_structure(), _ES384)
        except InvalidSignature:
            raise VerificationError(
                "the COSE signature does not verify with the leaf certificate's key: the payload or "
                "signature was altered, or the document was signed by another key; do not trust it"
            ) from None

        # 6. The verified result.
        return _result(doc, raw, cached.chain, at)

    def _validate_chain(
        self, doc: AttestationDocument, at: datetime, bundle_key: bytes
    ) -> _CachedChain:
        """Steps 2-4; the result says whether the caches may keep it.

        Why the caches are sound. pyca's path building is a depth-first search: from the leaf (depth 0), try
        every pinned root and every offered intermediate whose subject encoding equals the working
        certificate's issuer, in turn; a candidate that passes the CA profile at that depth and whose key
        verifies the working certificate is recursed into; a pinned root ends the search. It gives up after
        :data:`PYCA_SIGNATURE_BUDGET` signature checks. A path is cached only when it is *simple*: the
        cabundle is exactly the path, root first (``cabundle == reversed(chain[1:])``), its subject encodings
        are distinct, and ``len(cabundle) × (1 + roots) < budget``. Over a simple cabundle each depth has one
        intermediate candidate (the path's certificate) besides pinned roots, each of which ends the search,
        so the search costs at most ``len(cabundle) × (1 + roots)`` signature checks; it never runs out of
        budget, and at any instant where every certificate of the path is valid it accepts (along the path, or
        earlier at a pinned root). Signatures, names and extension profiles do not depend on the time; so the
        verdict for the same (leaf, cabundle) at any instant of the window is "accept": that is the full-path
        cache.

        The CA-path cache holds the simple CA path ``chain[1:]`` of a cabundle without name constraints,
        policy constraints or inhibitAnyPolicy anywhere (nor in the pinned roots): the only checks of a path
        that involve both the leaf and a CA above its issuer. For a new leaf, pyca validates it with the same
        policy against a store holding only the cached issuer ``chain[1]`` (= ``cabundle[-1]``): the leaf
        profile, the issuer's CA profile at depth 0, the issuer's signature on the leaf, the validity of both.
        If it accepts, a full search over the cabundle would reach the same issuer at depth 0 (the only
        intermediate with that subject) with the same outcome, and continue from it exactly as for the leaf
        the path was cached for: it accepts too. If it does not accept, the full validation below runs, so
        that the verdict and the message are a fresh verifier's.
        """
        ca_path = self._ca_paths.get(bundle_key, at)
        if ca_path is not None:
            # The cabundle parsed, passed the P-384 checks and had a pinned root when it was cached (the
            # cache key is its exact bytes and the roots are immutable): a fresh verifier would get as far.
            (leaf,) = _parse_certs((doc.certificate,))
            leaf_key = _require_p384(leaf, "certificate")
            assert ca_path.issuer_store is not None
            try:
                link = _path_verifier(ca_path.issuer_store, at).verify(leaf, [])
            except (pkix.VerificationError, ValueError, UnsupportedAlgorithm):
                link = None  # not a provable accept: decide by full path validation
            if link is not None and len(link.chain) == 2:
                _check_leaf(leaf)
                return _CachedChain(
                    (leaf, *ca_path.chain),
                    max(ca_path.not_before, leaf.not_valid_before_utc),
                    min(ca_path.not_after, leaf.not_valid_after_utc),
                    leaf_key,
                    cacheable=True,
                )

        # 2. Parse; restrict algorithms.
        leaf, *bundle = _parse_certs((doc.certificate, *doc.cabundle))
        leaf_key = _require_p384(leaf, "certificate")

        # 3. The bundle's root is compared with the pinned roots, never trusted.
        if doc.cabundle[0] not in self._root_der:  # whole-certificate equality, not a byte pattern
            root = _parse_cert(doc.cabundle[0], "cabundle[0]")
            raise VerificationError(
                f"the document's root certificate ({root.subject.rfc4514_string()}, SHA-256 "
                f"{fingerprint(root)}) is not a pinned trust root (pinned: "
                f"{', '.join(fingerprint(r)[:16] + '…' for r in self._roots)}); the document was not "
                "issued by the PKI you trust. Pass --root only for a root you trust"
            )

        # 4. RFC 5280 path validation at `at`; intermediates are untrusted path material.
        fields = [_certificate_fields(der) for der in doc.cabundle]
        for i, (cert, found) in enumerate(zip(bundle, fields, strict=True)):
            _require_p384_ca(cert, found[1] if found else None, f"cabundle[{i}]")
        chain = self._validate_path(leaf, bundle[1:], at)
        _check_leaf(leaf)
        simple = self._is_simple(chain, bundle, [found[0] if found else None for found in fields])
        if (
            simple
            and not self._roots_constrain
            and not any(
                _has_constraints(c, der) for c, der in zip(bundle, doc.cabundle, strict=True)
            )
        ):
            self._ca_paths.put(bundle_key, _CachedChain.of_ca_path(chain[1:]))
        return _CachedChain(
            chain,
            max(c.not_valid_before_utc for c in chain),
            min(c.not_valid_after_utc for c in chain),
            leaf_key,
            cacheable=simple,
        )

    def _is_simple(
        self,
        chain: tuple[x509.Certificate, ...],
        bundle: list[x509.Certificate],
        subjects: list[bytes | None],
    ) -> bool:
        """The cabundle is exactly the validated path, root first, with distinct subjects, and small enough
        that pyca's search over it cannot run out of budget (see :meth:`_validate_chain`).

        ``subjects`` are the DER of the cabundle's subject names: pyca matches an issuer name to a subject by
        its encoding (a PrintableString "a" is not a UTF8String "a"), so distinct encodings mean distinct
        candidates."""
        # pyca returns the certificate objects it was given: identity (cheap) stands for equality, and a
        # miss only means "not cached". The root on the path is the pinned root's object, not bundle[0]'s.
        return (
            len(chain) == len(bundle) + 1
            and len(bundle) * (1 + len(self._roots)) < PYCA_SIGNATURE_BUDGET
            and all(a is b for a, b in zip(chain[1:-1], bundle[:0:-1], strict=True))
            and chain[-1] == bundle[0]
            and None not in subjects
            and len(set(subjects)) == len(subjects)
        )

    def _validate_path(
        self, leaf: x509.Certificate, intermediates: list[x509.Certificate], at: datetime
    ) -> tuple[x509.Certificate, ...]:
        try:
            return tuple(_path_verifier(self._store, at).verify(leaf, intermediates).chain)
        except pkix.VerificationError as exc:
            raise VerificationError(
                f"the certificate chain does not validate to a pinned root at {at.isoformat()}: {exc}. "
                "If the document is archived, verify it at its own time (--at doc)"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        return {"roots": [r.public_bytes(Encoding.DER) for r in self._roots]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__([x509.load_der_x509_certificate(d) for d in state["roots"]])  # type: ignore[misc]


#: The CA profile of every path: pyca's web-PKI defaults for CA certificates.
_CA_EXTENSIONS = pkix.ExtensionPolicy.webpki_defaults_ca()
#: The leaf profile, one definition for the cold and the cached path: pyca's RFC 5280 end-entity checks with
#: this extension policy (any extension allowed, but a critical one that pyca does not process — an
#: unrecognised OID, PolicyConstraints — is refused), then :func:`_check_leaf` (CA:FALSE, digitalSignature).
#: AWS leaves carry only basicConstraints and keyUsage; a web-PKI end-entity profile would demand SANs.
_LEAF_EXTENSIONS = pkix.ExtensionPolicy.permit_all()


def _path_verifier(store: pkix.Store, at: datetime) -> pkix.ClientVerifier:
    """The one path validator: every chain, cold or under a cached CA path, is validated by it."""
    return (
        pkix.PolicyBuilder()
        .store(store)
        .time(at.replace(tzinfo=None))
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=_CA_EXTENSIONS, ee_policy=_LEAF_EXTENSIONS)
        .build_client_verifier()
    )


def check_document_kind(doc: AttestationDocument, *, allow_nitrotpm: bool = False) -> None:
    """Refuse a document whose module id contradicts its PCR map, and a NitroTPM document unless allowed.

    Decided on the decoded structure: the payload's PCR map (``pcrs`` / ``nitrotpm_pcrs``) and the parts of
    the module id (:attr:`AttestationDocument.kind_inconsistency`)."""
    inconsistency = doc.kind_inconsistency
    if inconsistency is not None:
        raise DocumentKindError(
            f"inconsistent attestation document: {inconsistency}; AWS never issues such a document, "
            "do not trust it"
        )
    if doc.kind is DocumentKind.NITROTPM and not allow_nitrotpm:
        raise NitroTpmDocumentError(
            f"the document is a NitroTPM attestation document (module {doc.module_id}, "
            "'nitrotpm_pcrs'), not a Nitro Enclaves document: it comes from an EC2 instance's TPM, "
            "whose PCRs the instance's operating system extends at will, so it proves nothing about an "
            "enclave. Expected an enclave document ('pcrs', module id i-…-enc…); accept NitroTPM "
            "documents only on purpose (--allow-nitrotpm, allow_nitrotpm=True) with NitroTPM PCR checks"
        )


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return at.astimezone(UTC)


def _parse_cert(der: bytes, name: str) -> x509.Certificate:
    return _parse_certs((der,), (name,))[0]


def _parse_certs(
    ders: Sequence[bytes], names: Sequence[str] | None = None
) -> list[x509.Certificate]:
    """Parse DER certificates (``names`` label them in errors: default the leaf, then the cabundle)."""
    labels = names or ("certificate", *(f"cabundle[{i}]" for i in range(len(ders) - 1)))
    certs: list[x509.Certificate] = []
    # RFC 5280 violations that pyca only warns about (e.g. a non-positive serial) are refused.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        for der, name in zip(ders, labels, strict=True):
            try:
                certs.append(x509.load_der_x509_certificate(der))
            except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
                raise MalformedInput(
                    f"{name} is not a valid DER X.509 certificate: {exc}"
                ) from None
    return certs


def _require_p384(cert: x509.Certificate, name: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise VerificationError(
            f"{name}: unsupported public key ({exc}); expected EC P-384"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        found = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise VerificationError(f"{name} has a {found} key; expected EC P-384 (secp384r1)")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise VerificationError(
            f"{name} is signed with {cert.signature_algorithm_oid.dotted_string}; "
            "expected ecdsa-with-SHA384"
        )
    return key


#: The DER of a P-384 SubjectPublicKeyInfo is these 24 bytes and the 96 bytes of the point's coordinates:
#: SEQUENCE (118) { SEQUENCE (16) { id-ecPublicKey, secp384r1 }, BIT STRING (98) { 0 unused bits, 0x04 (an
#: uncompressed point), X, Y } }. DER being unique, a SubjectPublicKeyInfo field of 120 bytes beginning with
#: them *is* (by value) an uncompressed P-384 key with exactly these algorithm parameters.
_P384_SPKI_PREFIX = bytes.fromhex("3076301006072a8648ce3d020106052b8104002203620004")
_P384_SPKI_SIZE = len(_P384_SPKI_PREFIX) + 96


def _require_p384_ca(cert: x509.Certificate, spki: bytes | None, name: str) -> None:
    """:func:`_require_p384` for CA certificates without loading their keys (pyca loads them again to verify,
    and a first key load is a noticeable part of a cold verification).

    Decides on the certificate's own SubjectPublicKeyInfo field ``spki`` (:func:`_certificate_fields`, read
    from the bytes pyca parsed into ``cert``), never on bytes found elsewhere in the certificate: it must
    have the P-384 shape above, and the signature algorithm must be ecdsa-with-SHA384. Any other
    SubjectPublicKeyInfo goes to :func:`_require_p384`, which loads the key and accepts it only if it is P-384
    (so the shortcut can only send a certificate to the slower check). Not checked here: that the point is on
    the curve — pyca checks that when the key verifies a signature, as the key of every certificate on the
    validated path does."""
    if (
        spki is None
        or len(spki) != _P384_SPKI_SIZE
        or spki[: len(_P384_SPKI_PREFIX)] != _P384_SPKI_PREFIX
    ):
        _require_p384(cert, name)  # slow path: load the key and explain what was found
        return
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise VerificationError(
            f"{name} is signed with {cert.signature_algorithm_oid.dotted_string}; "
            "expected ecdsa-with-SHA384"
        )


def _der_element(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the contents, end) of the DER element at ``pos``: one-byte tag, definite length."""
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
    return tag, pos + 2 + count, pos + 2 + count + length


def _certificate_fields(der: bytes) -> tuple[bytes, bytes] | None:
    """The DER of a certificate's subject and subjectPublicKeyInfo fields, found by walking the structure
    (RFC 5280 §4.1: Certificate = SEQUENCE { tbsCertificate, ... }; tbsCertificate = SEQUENCE { [0] version,
    serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ... }).

    ``der`` must be bytes pyca has parsed as a certificate (strict DER, nothing after it), so the walk meets
    only well-formed elements; anything unexpected returns None (the caller then loads the key, and does not
    cache)."""
    try:
        tag, pos, end = _der_element(der, 0)  # Certificate
        if tag != 0x30 or end != len(der):
            return None
        tag, pos, end = _der_element(der, pos)  # tbsCertificate
        if tag != 0x30:
            return None
        if der[pos] == 0xA0:  # [0] EXPLICIT version
            pos = _der_element(der, pos)[2]
        # serialNumber, signature, issuer, validity
        for expected in (0x02, 0x30, 0x30, 0x30):
            tag, _, pos = _der_element(der, pos)
            if tag != expected:
                return None
        tag, _, subject_end = _der_element(der, pos)
        spki_tag, _, spki_end = _der_element(der, subject_end)
    except IndexError:
        return None
    if tag != 0x30 or spki_tag != 0x30 or spki_end > end:
        return None
    return der[pos:subject_end], der[subject_end:spki_end]


def _check_leaf(leaf: x509.Certificate) -> None:
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise VerificationError(
                "the leaf certificate is a CA (CA:TRUE); expected an end entity"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise VerificationError(
            "the leaf certificate has no keyUsage; expected digitalSignature"
        ) from None
    if not ku.digital_signature:
        raise VerificationError("the leaf certificate's keyUsage lacks digitalSignature")


#: DER of the OIDs of NameConstraints (2.5.29.30), PolicyConstraints (2.5.29.36) and InhibitAnyPolicy
#: (2.5.29.54): tag, length and value of the extnID, whose DER encoding is unique (pyca's parser refuses
#: non-minimal lengths and OID arcs). A certificate whose DER contains none of them cannot carry those
#: extensions; one that contains one of them somewhere is parsed to decide.
_CONSTRAINT_OIDS = (b"\x06\x03\x55\x1d\x1e", b"\x06\x03\x55\x1d\x24", b"\x06\x03\x55\x1d\x36")


def _has_constraints(cert: x509.Certificate, der: bytes) -> bool:
    """Constraints a CA imposes on what it issues; paths with them are never short-cut by the CA cache.

    ``der`` is ``cert``'s DER encoding (passed in: re-encoding costs as much as the check)."""
    # Byte-pattern shortcut, sound in one direction only: "absent ⇒ no such extension" holds for any DER
    # certificate pyca parsed (a cached certificate's extensions were all parsed by path validation, which
    # refuses undecodable ones); "present" decides nothing and parses. An error can only be a false
    # "present": a certificate not cached. Parsing a fresh certificate's extensions costs more than a
    # signature check, hence the shortcut.
    if not any(oid in der for oid in _CONSTRAINT_OIDS):
        return False
    for ext_type in (x509.NameConstraints, x509.PolicyConstraints, x509.InhibitAnyPolicy):
        try:
            cert.extensions.get_extension_for_class(ext_type)
        except x509.ExtensionNotFound:
            continue
        return True
    return False


# -- batch workers ---------------------------------------------------------------------------------

#: ``verify_many`` verifies batches smaller than this in its own process: below it, starting worker
#: processes and shipping results back costs more than the parallel verification saves (issue 18;
#: measured with benchmarks/bench_verify.py, see docs/verify.md).
PROCESS_MIN_DOCUMENTS = 1000

_worker_verifier: Verifier | None = None


def _init_worker(roots: list[bytes]) -> None:
    global _worker_verifier
    _worker_verifier = Verifier([x509.load_der_x509_certificate(d) for d in roots])


#: Error classes a worker may report, by name (others become VerificationError).
_WORKER_ERRORS: dict[str, type[Error]] = {
    cls.__name__: cls
    for cls in (MalformedInput, VerificationError, DocumentKindError, NitroTpmDocumentError)
}


def _verify_in_worker(
    raw: bytes, at: datetime, allow_nitrotpm: bool = False
) -> tuple[str | bytes, ...]:
    """Run steps 1-5 in a worker: ("ok", chain DER...) or (error class name, message)."""
    active = _worker_verifier
    assert active is not None
    try:
        verified = active._verify_crypto(raw, at, allow_nitrotpm)
    except Error as exc:
        return (type(exc).__name__, str(exc))
    return ("ok", *(c.public_bytes(Encoding.DER) for c in verified.chain))


def _result(
    doc: AttestationDocument, raw: bytes, chain: tuple[x509.Certificate, ...], at: datetime
) -> VerifiedAttestation:
    return VerifiedAttestation(
        module_id=doc.module_id,
        timestamp=doc.timestamp,
        pcrs=doc.pcrs,
        public_key=doc.public_key,
        user_data=doc.user_data,
        nonce=doc.nonce,
        certificate=chain[0],
        is_debug=doc.is_debug,
        is_nitrotpm=doc.is_nitrotpm,
        verified_at=at,
        chain=chain,
        document=doc,
        raw=bytes(raw),
        kind=doc.kind,
        nitrotpm_pcrs=doc.nitrotpm_pcrs,
        _token=_CONSTRUCT,
    )
