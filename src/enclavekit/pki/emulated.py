"""An emulated PKI shaped like AWS's Nitro Enclaves PKI, for the NSM emulator.

The chain is ``root → regional → zonal → instance → leaf`` with the subject DN attribute orders,
extensions (and their order), criticality, pathLen values, key types, serial layouts and lifetimes
measured on genuine AWS documents (``attestation.md`` §1.5):

=========  ===============================================  ==========  ============================
level      subject CN                                       lifetime    extensions, in order
=========  ===============================================  ==========  ============================
root       ``enclavekit-emulator.nitro-enclaves``           30 y + 1 h  BC CA!, SKI, KU!
regional   ``<16 hex>.<region>.aws.nitro-enclaves``         20 d 1 h    BC(2)!, AKI, SKI, KU!, CRLDP
zonal      ``<hex>.zonal.<region>.aws.nitro-enclaves``      5 d 22 h    BC(1)!, AKI, SKI, KU!, CRLDP
instance   ``<instance id>.<region>.aws.nitro-enclaves``    1 d         BC(0)!, KU!(cert), SKI, AKI
leaf       ``<module id>.<region>.aws``                     3 h + 3 s   BC CA:FALSE!, KU (not crit.)
=========  ===============================================  ==========  ============================

(``!`` = critical, ``BC(n)`` = CA with pathLen n.)

Deliberate differences from AWS, so that an emulated chain can never be mistaken for a real one: the
root's common name is ``enclavekit-emulator.nitro-enclaves`` (AWS: ``aws.nitro-enclaves``) and the
CRL distribution points name the host ``crl.enclavekit-emulator.invalid``. The root's validity
window copies AWS's G1 root (2019-10-28 13:28:05 → 2049-10-28 14:28:05 UTC), which keeps both dates
in UTCTime like AWS's.

The root (key and certificate) persists in a state directory so that verifiers can pin it
(:meth:`EmulatedAwsPki.load_or_create`); the intermediate CAs and leaves live in memory and rotate:
a CA is replaced when it can no longer cover its child's lifetime, a leaf 15 minutes before it
expires (as AWS does). Nothing here is trusted by default anywhere in enclavekit: a verifier must be
handed :meth:`root_certificate` explicitly. What is *not* emulated: CRLs (the URLs resolve nowhere)
and AWS's unpublished key management.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclavekit._fs import write_atomic
from enclavekit.errors import UsageError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

#: The AWS G1 root's validity window, reused for the emulated root (30 years + 1 hour, UTCTime
#: encodable).
ROOT_NOT_BEFORE = datetime(2019, 10, 28, 13, 28, 5, tzinfo=UTC)
ROOT_NOT_AFTER = datetime(2049, 10, 28, 14, 28, 5, tzinfo=UTC)
ROOT_COMMON_NAME = "enclavekit-emulator.nitro-enclaves"
REGIONAL_LIFETIME = timedelta(days=20, hours=1)
ZONAL_LIFETIME = timedelta(days=5, hours=22)
INSTANCE_LIFETIME = timedelta(days=1)
#: Leaf: notBefore = issuance − 3 s, notAfter = issuance + 3 h (AWS since 2022).
LEAF_BACKDATE = timedelta(seconds=3)
LEAF_LIFETIME = timedelta(hours=3)
#: AWS reissues the leaf about 15 minutes before it expires (MaplePrivacyLabs/Maple#936).
LEAF_ROTATE_BEFORE = timedelta(minutes=15)
#: A new CA is backdated by this much so that clock skew between processes cannot make it "not yet
#: valid".
CA_BACKDATE = timedelta(minutes=1)
CRL_HOST = "crl.enclavekit-emulator.invalid"
DEFAULT_REGION = "us-east-1"

_ROOT_KEY_FILE = "root-key.pem"
_ROOT_CERT_FILE = "root.pem"


def default_state_dir() -> Path:
    """``$ENCLAVEKIT_STATE_DIR/nsm`` if set, else ``$XDG_STATE_HOME/enclavekit/nsm``, else
    ``~/.local/state/...``.
    """
    explicit = os.environ.get("ENCLAVEKIT_STATE_DIR")
    if explicit:
        return Path(explicit) / "nsm"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "enclavekit" / "nsm"


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate together with its private key."""

    certificate: x509.Certificate
    der: bytes
    key: ec.EllipticCurvePrivateKey

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class SigningCredentials:
    """What an emulated NSM needs to sign a document: the leaf key and the chain, DER and
    pre-encoded.

    ``encoded_chain`` is the CBOR of the two payload entries ``"certificate": <leaf>`` and
    ``"cabundle": [root, regional, zonal, instance]``, cached because it is the same for every
    document the leaf signs.
    """

    key: ec.EllipticCurvePrivateKey
    certificate: bytes
    cabundle: tuple[bytes, ...]
    encoded_chain: bytes
    not_after: datetime


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    # One attribute per RDN, in the given (DER) order; C is a PrintableString, the rest UTF8String
    # (as AWS).
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _root_name() -> x509.Name:
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, ROOT_COMMON_NAME),
    )


def _regional_name(common_name: str) -> x509.Name:
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, common_name),
    )


def _zonal_name(common_name: str) -> x509.Name:
    return _name(
        (NameOID.COMMON_NAME, common_name),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.STATE_OR_PROVINCE_NAME, "WA"),
        (NameOID.LOCALITY_NAME, "Seattle"),
    )


def _instance_or_leaf_name(common_name: str) -> x509.Name:
    return _name(
        (NameOID.COUNTRY_NAME, "US"),
        (NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
        (NameOID.LOCALITY_NAME, "Seattle"),
        (NameOID.ORGANIZATION_NAME, "Amazon"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS"),
        (NameOID.COMMON_NAME, common_name),
    )


def _seconds(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _ca_key_usage(*, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=crl_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _crl_points(path: str) -> x509.CRLDistributionPoints:
    url = f"http://{CRL_HOST}/{path}/{uuid.uuid4()}.crl"
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _aki(issuer: IssuedCertificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issue(
    builder: x509.CertificateBuilder, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    return builder.sign(signer, hashes.SHA384())


def _finish(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedCertificate:
    return IssuedCertificate(cert, cert.public_bytes(serialization.Encoding.DER), key)


def create_root() -> IssuedCertificate:
    """A new emulated root CA (self-signed, P-384, the AWS G1 root's extensions and validity
    window).
    """
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_root_name())
        .issuer_name(_root_name())
        .public_key(key.public_key())
        .serial_number(secrets.randbits(128) or 1)
        .not_valid_before(ROOT_NOT_BEFORE)
        .not_valid_after(ROOT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(_ca_key_usage(crl_sign=True), critical=True)
    )
    return _finish(_issue(builder, key), key)


def leaf_serial(enclave_id: int, issued: datetime) -> int:
    """AWS's leaf serial: 8-byte enclave id ‖ 4 zero bytes ‖ 4-byte big-endian issuance time."""
    seconds = int(_seconds(issued).timestamp())
    return int.from_bytes(
        enclave_id.to_bytes(8, "big") + bytes(4) + seconds.to_bytes(4, "big"), "big"
    )


class EmulatedAwsPki:
    """The emulated CA hierarchy. Thread-safe; cheap to ask for credentials (cached until rotation).

    Build one with :meth:`load_or_create` (root persisted in a state directory) or :meth:`ephemeral`
    (root only in memory, for tests). ``clock`` is only the default for :meth:`credentials` calls
    that pass no ``now``.
    """

    def __init__(
        self, root: IssuedCertificate, *, region: str = DEFAULT_REGION, clock: Clock = utc_now
    ) -> None:
        if not region or "/" in region:
            raise ValueError(f"bad region name {region!r}")
        self._root = root
        self.region = region
        self._clock = clock
        self._lock = threading.Lock()
        self._regional: IssuedCertificate | None = None
        self._zonal: IssuedCertificate | None = None
        self._instances: dict[str, IssuedCertificate] = {}
        self._leaves: dict[str, tuple[IssuedCertificate, SigningCredentials]] = {}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def ephemeral(cls, *, region: str = DEFAULT_REGION, clock: Clock = utc_now) -> EmulatedAwsPki:
        """A PKI with a fresh root that is not saved anywhere (tests, one-shot runs)."""
        return cls(create_root(), region=region, clock=clock)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path | str | None = None,
        *,
        region: str = DEFAULT_REGION,
        clock: Clock = utc_now,
    ) -> EmulatedAwsPki:
        """Load the root from ``state_dir`` (default :func:`default_state_dir`), creating it on
        first use.

        The key is written with mode 0600 and both files are replaced atomically; concurrent first
        uses by several processes agree on one root (a lock file serialises them).
        """
        directory = Path(state_dir) if state_dir is not None else default_state_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(directory / ".lock"):
            root = _load_root(directory)
            if root is None:
                root = create_root()
                _save_root(directory, root)
                log.info("created a new emulated NSM root in %s", directory)
        return cls(root, region=region, clock=clock)

    # -- access --------------------------------------------------------------------------------

    @property
    def root(self) -> IssuedCertificate:
        return self._root

    def root_certificate(self) -> x509.Certificate:
        """The emulated root: pin it in a verifier to accept emulated documents (never trusted by
        default).
        """
        return self._root.certificate

    def root_pem(self) -> bytes:
        """The emulated root certificate, PEM."""
        return self._root.certificate.public_bytes(serialization.Encoding.PEM)

    def credentials(
        self,
        *,
        module_id: str,
        instance_id: str,
        enclave_id: int,
        now: datetime | None = None,
    ) -> SigningCredentials:
        """Signing credentials for one enclave at ``now``: reuses the current leaf, rotating it when
        due.

        The returned leaf is valid at ``now`` and every CA above it covers the leaf's whole
        lifetime.
        """
        moment = (now or self._clock()).astimezone(UTC)
        with self._lock:
            current = self._leaves.get(module_id)
            if current is not None:
                leaf, creds = current
                if leaf.not_before <= moment < leaf.not_after - LEAF_ROTATE_BEFORE:
                    return creds
            leaf_not_before = _seconds(moment) - LEAF_BACKDATE
            leaf_not_after = _seconds(moment) + LEAF_LIFETIME
            instance = self._instance(instance_id, moment, leaf_not_before, leaf_not_after)
            leaf = self._issue_leaf(module_id, enclave_id, moment, instance)
            assert self._regional is not None
            assert self._zonal is not None
            cabundle = (self._root.der, self._regional.der, self._zonal.der, instance.der)
            encoded_chain = (
                cbor2.dumps("certificate")
                + cbor2.dumps(leaf.der)
                + cbor2.dumps("cabundle")
                + cbor2.dumps(list(cabundle))
            )
            creds = SigningCredentials(leaf.key, leaf.der, cabundle, encoded_chain, leaf.not_after)
            self._leaves[module_id] = (leaf, creds)
            return creds

    # -- rotation ------------------------------------------------------------------------------

    @staticmethod
    def _covers(ca: IssuedCertificate | None, start: datetime, end: datetime) -> bool:
        return ca is not None and ca.not_before <= start and end <= ca.not_after

    def _regional_ca(self, moment: datetime, start: datetime, end: datetime) -> IssuedCertificate:
        if not self._covers(self._regional, start, end):
            key = _new_key()
            not_before = _seconds(min(moment, start)) - CA_BACKDATE
            builder = (
                x509.CertificateBuilder()
                .subject_name(
                    _regional_name(f"{secrets.token_hex(8)}.{self.region}.aws.nitro-enclaves")
                )
                .issuer_name(self._root.certificate.subject)
                .public_key(key.public_key())
                .serial_number(secrets.randbits(128) or 1)
                .not_valid_before(not_before)
                .not_valid_after(min(not_before + REGIONAL_LIFETIME, ROOT_NOT_AFTER))
                .add_extension(x509.BasicConstraints(ca=True, path_length=2), critical=True)
                .add_extension(_aki(self._root), critical=False)
                .add_extension(_ski(key), critical=False)
                .add_extension(_ca_key_usage(crl_sign=True), critical=True)
                .add_extension(_crl_points("crl"), critical=False)
            )
            self._regional = _finish(_issue(builder, self._root.key), key)
            self._zonal = None  # a new parent means new children
            self._instances.clear()
        assert self._regional is not None
        return self._regional

    def _zonal_ca(self, moment: datetime, start: datetime, end: datetime) -> IssuedCertificate:
        if not self._covers(self._zonal, start, end):
            not_before = _seconds(min(moment, start)) - CA_BACKDATE
            not_after = not_before + ZONAL_LIFETIME
            regional = self._regional_ca(moment, not_before, not_after)
            key = _new_key()
            zone = f"{secrets.randbits(64):x}"  # AWS does not zero-pad this id
            builder = (
                x509.CertificateBuilder()
                .subject_name(_zonal_name(f"{zone}.zonal.{self.region}.aws.nitro-enclaves"))
                .issuer_name(regional.certificate.subject)
                .public_key(key.public_key())
                .serial_number(secrets.randbits(128) or 1)
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(_aki(regional), critical=False)
                .add_extension(_ski(key), critical=False)
                .add_extension(_ca_key_usage(crl_sign=True), critical=True)
                .add_extension(_crl_points(f"{self.region}/crl"), critical=False)
            )
            self._zonal = _finish(_issue(builder, regional.key), key)
            self._instances.clear()
        assert self._zonal is not None
        return self._zonal

    def _instance(
        self, instance_id: str, moment: datetime, start: datetime, end: datetime
    ) -> IssuedCertificate:
        current = self._instances.get(instance_id)
        if self._covers(current, start, end) and self._covers(self._zonal, start, end):
            assert current is not None
            return current
        not_before = _seconds(min(moment, start)) - CA_BACKDATE
        not_after = not_before + INSTANCE_LIFETIME
        zonal = self._zonal_ca(moment, not_before, not_after)
        key = _new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_instance_or_leaf_name(f"{instance_id}.{self.region}.aws.nitro-enclaves"))
            .issuer_name(zonal.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(crl_sign=False), critical=True)
            .add_extension(_ski(key), critical=False)
            .add_extension(_aki(zonal), critical=False)
        )
        issued = _finish(_issue(builder, zonal.key), key)
        self._instances[instance_id] = issued
        return issued

    def _issue_leaf(
        self, module_id: str, enclave_id: int, moment: datetime, instance: IssuedCertificate
    ) -> IssuedCertificate:
        key = _new_key()
        issued_at = _seconds(moment)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_instance_or_leaf_name(f"{module_id}.{self.region}.aws"))
            .issuer_name(instance.certificate.subject)
            .public_key(key.public_key())
            .serial_number(leaf_serial(enclave_id, issued_at))
            .not_valid_before(issued_at - LEAF_BACKDATE)
            .not_valid_after(issued_at + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=False,
            )
        )
        return _finish(_issue(builder, instance.key), key)


# -- persistence -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _load_root(directory: Path) -> IssuedCertificate | None:
    key_path, cert_path = directory / _ROOT_KEY_FILE, directory / _ROOT_CERT_FILE
    if not key_path.exists() and not cert_path.exists():
        return None
    if not (key_path.exists() and cert_path.exists()):
        raise UsageError(
            f"emulator state in {directory} is incomplete: expected both {_ROOT_KEY_FILE} and "
            f"{_ROOT_CERT_FILE}; remove the directory to start with a new root"
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise UsageError(
            f"emulator state in {directory} is unreadable ({exc}); "
            "remove the directory to start over"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise UsageError(f"{key_path}: expected an EC P-384 private key")
    if key.public_key() != cert.public_key():
        raise UsageError(
            f"{key_path} does not belong to {cert_path}; remove {directory} to start over"
        )
    return _finish(cert, key)


def _save_root(directory: Path, root: IssuedCertificate) -> None:
    key_pem = root.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = root.certificate.public_bytes(serialization.Encoding.PEM)
    _atomic_write(directory / _ROOT_KEY_FILE, key_pem, 0o600)
    _atomic_write(directory / _ROOT_CERT_FILE, cert_pem, 0o644)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode=mode, durable=True)


def root_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex (how the CLI names a root)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
