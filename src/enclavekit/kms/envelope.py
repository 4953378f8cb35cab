"""CMS EnvelopedData as KMS returns it in ``CiphertextForRecipient``: decode, match, decrypt, encode.

Decoding (:meth:`Envelope.from_ber`) accepts BER (indefinite lengths, chunked content, as KMS sends) and
DER (as ``openssl cms -encrypt`` writes), and enforces, with one :class:`MalformedInput` per defect:

1. a ContentInfo of type envelopedData, nothing after it, at most :data:`MAX_ENVELOPE_SIZE` bytes;
2. EnvelopedData version 0 or 2 (RFC 5652 §6.1), no originatorInfo certificates needed;
3. key-transport recipients (KeyTransRecipientInfo) whose version agrees with the identifier form —
   0 with issuerAndSerialNumber, 2 with subjectKeyIdentifier; other recipient kinds are kept but unused;
4. key encryption RSAES-OAEP with SHA-256, MGF1-SHA-256 and an empty label (``RSAES_OAEP_SHA_256``);
5. content encryption AES-256-CBC (another algorithm is refused as unsupported).

Decrypting (:meth:`Envelope.decrypt`) picks the recipient meant for the private key — subjectKeyIdentifier
equal to SHA-256 of the DER SubjectPublicKeyInfo (KMS), the RFC 5280 SHA-1 key id, or the certificate's
SKI extension / issuer and serial when a certificate is given — and falls back to trial decryption
(OAEP's integrity check tells a wrong key) for recipients that cannot be matched by identifier. A key
that opens no recipient raises :class:`NotForThisKey` (exit 1). PKCS#1 v1.5 key transport is refused
at decoding (step 4), so the private key never sees a ciphertext that a Bleichenbacher oracle could use;
OAEP failures are one ``ValueError`` from OpenSSL, whatever went wrong inside.

No padding oracle: everything after the RSA step — the content key's length, the encrypted content's
type (id-data), its IV (16 bytes), its presence and length (whole AES blocks), the PKCS#7 padding
(checked by pyca's constant-time unpadder) and, when the caller gives ``expected_length``, the
plaintext's length — is computed in full and folded into one verdict: any failure raises one
:class:`UndecryptableEnvelope` with one fixed message (exit 1), so a party that relays envelopes and
sees the outcome cannot tell a bad padding from any other defect. Only the outer structure and the
recipients are checked while decoding; their errors depend on nothing but the bytes sent.

Not checked: anything about the sender — EnvelopedData is not signed, so the envelope proves nothing about
who made it; AES-CBC has no integrity (a tampered ciphertext decrypts to garbage when its padding
happens to be valid). A caller that does not know the plaintext's length still reveals valid padding as
success: it must not let a relay retry envelopes without bound.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from enclavekit.errors import MalformedInput, VerificationError

#: KMS caps CiphertextForRecipient at 6144 base64 characters; openssl envelopes may carry more content.
#: Anything larger than this is refused before parsing.
MAX_ENVELOPE_SIZE = 16 * 1024 * 1024
#: An envelope with more recipients than this is refused (KMS sends one).
MAX_RECIPIENTS = 64
AES_BLOCK = 16
CEK_SIZE = 32

RidKind = Literal["subject_key_identifier", "issuer_and_serial_number"]


class NotForThisKey(VerificationError):
    """No recipient of the envelope can be opened with the given private key (exit 1)."""


#: The one message of :class:`UndecryptableEnvelope`: it must not depend on what went wrong.
UNDECRYPTABLE_MESSAGE = (
    "the CMS envelope is addressed to this key but its encrypted content does not decrypt: expected "
    "AES-256-CBC id-data content with a 32-byte content key, a 16-byte IV, whole blocks, valid "
    "PKCS#7 padding and the expected plaintext length, found content that fails at least one of "
    "these (which one is deliberately not reported: CMS EnvelopedData has no integrity, so telling "
    "them apart would be a padding oracle); the envelope was altered or damaged on its way — request "
    "a new one from KMS, and do not retry failed envelopes without a bound"
)


class UndecryptableEnvelope(VerificationError):
    """The content key was unwrapped but the content does not decrypt (exit 1); one fixed message."""

    def __init__(self) -> None:
        super().__init__(UNDECRYPTABLE_MESSAGE)


@dataclass(frozen=True, slots=True)
class KeyTransRecipient:
    """One KeyTransRecipientInfo with RSAES-OAEP-SHA-256 key transport (validated on decode)."""

    rid_kind: RidKind
    #: subjectKeyIdentifier bytes (SKI form), else ``None``.
    key_identifier: bytes | None
    #: DER of the issuer Name and the serial number (issuerAndSerialNumber form), else ``None``.
    issuer: bytes | None
    serial_number: int | None
    encrypted_key: bytes

    def describe(self) -> str:
        if self.key_identifier is not None:
            return f"subjectKeyIdentifier {self.key_identifier.hex()}"
        return f"issuerAndSerialNumber (serial {self.serial_number})"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded CMS EnvelopedData (AES-256-CBC content, RSA-OAEP-SHA-256 recipients)."""

    version: int
    recipients: tuple[KeyTransRecipient, ...]
    #: Recipients of other kinds (kari, kekri, pwri, ori) present in the envelope; never used.
    other_recipients: int
    iv: bytes
    encrypted_content: bytes
    #: False when the encrypted content's type, IV or shape is wrong; :meth:`decrypt` then raises
    #: :class:`UndecryptableEnvelope` after the same work as for a bad padding.
    content_well_formed: bool = True

    @classmethod
    def from_ber(cls, data: bytes) -> Envelope:
        """Decode and validate ``data``; raise :class:`MalformedInput` naming the first defect."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise MalformedInput("CMS envelope is empty: expected a BER/DER ContentInfo")
        if len(data) > MAX_ENVELOPE_SIZE:
            raise MalformedInput(
                f"CMS envelope is {len(data)} bytes, more than the {MAX_ENVELOPE_SIZE}-byte limit"
            )
        try:
            return _decode(data)
        except MalformedInput:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise MalformedInput(
                f"CMS envelope is not valid BER/DER EnvelopedData: {_first_line(exc)}"
            ) from None

    def decrypt(
        self,
        private_key: rsa.RSAPrivateKey,
        *,
        certificate: x509.Certificate | None = None,
        expected_length: int | None = None,
    ) -> bytes:
        """Unwrap the content key with ``private_key`` and return the decrypted content.

        ``expected_length``: the plaintext's length when the caller knows it (32 for an AES-256 data key,
        ``NumberOfBytes`` for GenerateRandom); a plaintext of another length fails like a bad padding,
        which closes the padding oracle that a relay seeing success or failure would otherwise have.
        Raises :class:`NotForThisKey` when no recipient opens with the key, else
        :class:`UndecryptableEnvelope` for every failure after the RSA step.
        """
        if expected_length is not None and (
            isinstance(expected_length, bool)
            or not isinstance(expected_length, int)
            or expected_length < 0
        ):
            raise ValueError(f"expected_length must be a non-negative int, got {expected_length!r}")
        cek = self._unwrap_key(private_key, certificate)
        plaintext, ok = _open_content(cek, self.iv, self.encrypted_content, expected_length)
        # The one branch on the outcome, after all the work; `&` does not short-circuit.
        if not (ok & self.content_well_formed):
            raise UndecryptableEnvelope()
        return plaintext

    def _unwrap_key(
        self, private_key: rsa.RSAPrivateKey, certificate: x509.Certificate | None
    ) -> bytes:
        ids = key_identifiers(private_key.public_key(), certificate)
        matched = [r for r in self.recipients if _matches(r, ids, certificate)]
        others = [r for r in self.recipients if r not in matched]
        oaep = _oaep()
        for recipient in matched + others:
            try:
                return private_key.decrypt(recipient.encrypted_key, oaep)
            except ValueError:
                continue
        found = ", ".join(r.describe() for r in self.recipients) or "no key-transport recipient"
        if self.other_recipients:
            found += f" (+{self.other_recipients} recipient(s) of unsupported kinds)"
        raise NotForThisKey(
            "the envelope is not addressed to this key: expected a recipient with "
            f"subjectKeyIdentifier {ids[0].hex()} (SHA-256 of the key's SubjectPublicKeyInfo) "
            f"or one that this key can decrypt, found {found}; use the private key whose public "
            "key was in the attestation document's public_key"
        )


def _open_content(
    cek: bytes, iv: bytes, ciphertext: bytes, expected_length: int | None
) -> tuple[bytes, bool]:
    """Decrypt and unpad; return the plaintext and whether every check held.

    No early exit: a wrong-length key, IV or ciphertext is replaced by a stand-in of the right size so
    that AES and the unpadding run in every case, and the checks are combined without short-circuit.
    (Python cannot promise constant time; this keeps the control flow independent of the plaintext.)
    """
    key_ok = len(cek) == CEK_SIZE
    aes_key = cek if key_ok else os.urandom(CEK_SIZE)
    iv_ok = len(iv) == AES_BLOCK
    aes_iv = iv if iv_ok else bytes(AES_BLOCK)
    whole = len(ciphertext) - len(ciphertext) % AES_BLOCK
    shape_ok = whole == len(ciphertext) and whole > 0
    body = ciphertext[:whole] if whole else bytes(AES_BLOCK)
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(aes_iv)).decryptor()
    padded = decryptor.update(body) + decryptor.finalize()
    unpadder = padding.PKCS7(AES_BLOCK * 8).unpadder()
    head = unpadder.update(padded)
    try:
        tail = unpadder.finalize()  # pyca checks the padding bytes in constant time
        padding_ok = True
    except ValueError:
        tail = b""
        padding_ok = False
    plaintext = head + tail
    length_ok = expected_length is None or len(plaintext) == expected_length
    return plaintext, key_ok & iv_ok & shape_ok & padding_ok & length_ok


def key_identifiers(
    public_key: rsa.RSAPublicKey, certificate: x509.Certificate | None = None
) -> tuple[bytes, ...]:
    """Subject key identifiers that name ``public_key``: SHA-256(SPKI DER) first (KMS), then SHA-1
    of the subjectPublicKey bits (RFC 5280 §4.2.1.2 method 1), then the certificate's SKI extension."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ids = [hashlib.sha256(spki).digest()]
    ids.append(x509.SubjectKeyIdentifier.from_public_key(public_key).digest)
    if certificate is not None:
        try:
            ext = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            ids.append(ext.value.digest)
        except x509.ExtensionNotFound:
            pass
    return tuple(dict.fromkeys(ids))


def _matches(
    recipient: KeyTransRecipient, ids: tuple[bytes, ...], certificate: x509.Certificate | None
) -> bool:
    if recipient.key_identifier is not None:
        return recipient.key_identifier in ids
    if certificate is None:
        return False
    issuer = certificate.issuer.public_bytes()
    return recipient.issuer == issuer and recipient.serial_number == certificate.serial_number


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise MalformedInput(f"CMS envelope: {message}")


def _decode(data: bytes) -> Envelope:
    # Steps as in the module docstring. asn1crypto parses lazily, so every field is touched here.
    # 1. ContentInfo / envelopedData, no trailing bytes.
    info = cms.ContentInfo.load(data, strict=True)
    content_type = info["content_type"].dotted
    _require(
        content_type == "1.2.840.113549.1.7.3",
        f"expected content type envelopedData (1.2.840.113549.1.7.3), found {content_type}",
    )
    enveloped = info["content"]
    _require(isinstance(enveloped, cms.EnvelopedData), "content is not EnvelopedData")
    # 2. Version.
    version = _version(enveloped["version"].native)
    _require(version in (0, 2), f"expected EnvelopedData version 0 or 2, found {version}")
    # 3-4. Recipients.
    infos = enveloped["recipient_infos"]
    _require(len(infos) > 0, "expected at least one recipient, found none")
    _require(
        len(infos) <= MAX_RECIPIENTS,
        f"expected at most {MAX_RECIPIENTS} recipients, found {len(infos)}",
    )
    recipients: list[KeyTransRecipient] = []
    others = 0
    for index, info_choice in enumerate(infos):
        if info_choice.name != "ktri":
            others += 1
            continue
        recipients.append(_key_trans(info_choice.chosen, index))
    # 5. Encrypted content. Only the algorithm is refused here (unsupported); the content type, IV and
    # ciphertext shape are recorded and fail in `decrypt` with the padding, as one indistinguishable
    # error (module docstring).
    eci = enveloped["encrypted_content_info"]
    well_formed = eci["content_type"].dotted == "1.2.840.113549.1.7.1"
    algorithm = eci["content_encryption_algorithm"]
    algo_oid = algorithm["algorithm"].dotted
    _require(
        algo_oid == "2.16.840.1.101.3.4.1.42",
        f"expected content encryption aes256-CBC (2.16.840.1.101.3.4.1.42), found {algo_oid}",
    )
    iv = algorithm["parameters"].native
    if not isinstance(iv, bytes):
        iv, well_formed = b"", False
    encrypted = eci["encrypted_content"].native
    if encrypted is None:  # detached content
        encrypted, well_formed = b"", False
    ciphertext = bytes(encrypted)
    # unprotectedAttrs are allowed and ignored; touch them so lazily-parsed garbage is reported.
    _ = enveloped["unprotected_attrs"].native
    _ = enveloped["originator_info"].native
    return Envelope(version, tuple(recipients), others, iv, ciphertext, well_formed)


def _version(native: object) -> int:
    """asn1crypto maps known CMS versions to ``"v0"``..``"v5"`` and leaves others as ints."""
    if isinstance(native, str) and native.startswith("v") and native[1:].isdigit():
        return int(native[1:])
    if isinstance(native, int):
        return native
    raise MalformedInput(f"CMS envelope: version is not an integer ({native!r})")


def _key_trans(ktri: cms.KeyTransRecipientInfo, index: int) -> KeyTransRecipient:
    where = f"recipient {index}"
    version_text = ktri["version"].native
    rid = ktri["rid"]
    kind = rid.name
    if kind == "subject_key_identifier":
        _require(
            version_text == "v2",
            f"{where}: subjectKeyIdentifier requires version 2, found {version_text}",
        )
        ski = rid.chosen.native
        _require(isinstance(ski, bytes) and len(ski) > 0, f"{where}: empty subjectKeyIdentifier")
        issuer = None
        serial = None
    else:
        _require(
            version_text == "v0",
            f"{where}: issuerAndSerialNumber requires version 0, found {version_text}",
        )
        ski = None
        issuer = rid.chosen["issuer"].dump()
        serial = int(rid.chosen["serial_number"].native)
    _check_oaep(ktri["key_encryption_algorithm"], where)
    encrypted_key = ktri["encrypted_key"].native
    _require(
        isinstance(encrypted_key, bytes) and len(encrypted_key) > 0,
        f"{where}: encrypted key is empty",
    )
    return KeyTransRecipient(kind, ski, issuer, serial, encrypted_key)


def _check_oaep(algorithm: cms.KeyEncryptionAlgorithm, where: str) -> None:
    name = algorithm["algorithm"].dotted
    _require(
        name == "1.2.840.113549.1.1.7",
        f"{where}: expected key encryption RSAES-OAEP (1.2.840.113549.1.1.7) as KMS uses "
        f"(RSAES_OAEP_SHA_256), found {name}",
    )
    params = algorithm["parameters"]
    _require(
        isinstance(params, algos.RSAESOAEPParams),
        f"{where}: RSAES-OAEP parameters are missing; expected SHA-256 and MGF1-SHA-256",
    )
    digest = params["hash_algorithm"]["algorithm"].native
    _require(digest == "sha256", f"{where}: expected OAEP hash sha256, found {digest}")
    mgf = params["mask_gen_algorithm"]
    _require(
        mgf["algorithm"].native == "mgf1",
        f"{where}: expected mask generation mgf1, found {mgf['algorithm'].native}",
    )
    mgf_digest = mgf["parameters"]["algorithm"].native
    _require(mgf_digest == "sha256", f"{where}: expected MGF1 hash sha256, found {mgf_digest}")
    label = params["p_source_algorithm"]["parameters"].native
    _require(label in (b"", None), f"{where}: expected an empty OAEP label, found {label!r}")


# --- encoding (tests, the stand-in KMS, sealing to an attested key) -----------------------------


def _oaep_algorithm() -> cms.KeyEncryptionAlgorithm:
    sha256 = {"algorithm": "sha256", "parameters": core.Null()}
    return cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": sha256,
                    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": sha256},
                }
            ),
        }
    )


def _ber_indefinite(tag_byte: int, *parts: bytes) -> bytes:
    return bytes([tag_byte, 0x80]) + b"".join(parts) + b"\x00\x00"


def encode_envelope(
    plaintext: bytes,
    public_key: rsa.RSAPublicKey,
    *,
    rid: RidKind = "subject_key_identifier",
    certificate: x509.Certificate | None = None,
    ber: bool = True,
    chunk_size: int = 1024,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Encrypt ``plaintext`` to ``public_key`` as KMS does (AES-256-CBC, RSA-OAEP-SHA-256).

    ``rid="subject_key_identifier"`` names the key by SHA-256(SPKI DER) and uses versions 2/2 as KMS;
    ``"issuer_and_serial_number"`` needs ``certificate`` and uses versions 0/0 (RFC 5652 §6.1).
    ``ber=True`` writes KMS's indefinite-length BER with the ciphertext in ``chunk_size`` pieces;
    ``ber=False`` writes DER.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    cek = random(CEK_SIZE)
    iv = random(AES_BLOCK)
    padder = padding.PKCS7(AES_BLOCK * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = public_key.encrypt(cek, _oaep())

    if rid == "subject_key_identifier":
        version = "v2"
        rid_value = cms.RecipientIdentifier(
            name="subject_key_identifier", value=key_identifiers(public_key)[0]
        )
    elif rid == "issuer_and_serial_number":
        if certificate is None:
            raise ValueError("issuer_and_serial_number needs the recipient certificate")
        version = "v0"
        parsed = asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
        rid_value = cms.RecipientIdentifier(
            name="issuer_and_serial_number",
            value=cms.IssuerAndSerialNumber(
                {"issuer": parsed.issuer, "serial_number": parsed.serial_number}
            ),
        )
    else:
        raise ValueError(f"unknown recipient identifier form {rid!r}")
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": version,
            "rid": rid_value,
            "key_encryption_algorithm": _oaep_algorithm(),
            "encrypted_key": encrypted_key,
        }
    )
    recipient_infos = cms.RecipientInfos([cms.RecipientInfo(name="ktri", value=ktri)])
    content_algorithm = cms.EncryptionAlgorithm(
        {"algorithm": "aes256_cbc", "parameters": core.OctetString(iv)}
    )
    if not ber:
        info = cms.ContentInfo(
            {
                "content_type": "enveloped_data",
                "content": cms.EnvelopedData(
                    {
                        "version": version,
                        "recipient_infos": recipient_infos,
                        "encrypted_content_info": {
                            "content_type": "data",
                            "content_encryption_algorithm": content_algorithm,
                            "encrypted_content": ciphertext,
                        },
                    }
                ),
            }
        )
        return bytes(info.dump())
    chunks = b"".join(
        core.OctetString(ciphertext[i : i + chunk_size]).dump()
        for i in range(0, len(ciphertext), chunk_size)
    )
    encrypted_content_info = _ber_indefinite(
        0x30,
        core.ObjectIdentifier("1.2.840.113549.1.7.1").dump(),
        content_algorithm.dump(),
        _ber_indefinite(0xA0, chunks),  # [0] IMPLICIT, constructed
    )
    enveloped = _ber_indefinite(
        0x30,
        core.Integer(int(version[1:])).dump(),
        recipient_infos.dump(),
        encrypted_content_info,
    )
    return _ber_indefinite(
        0x30,
        core.ObjectIdentifier("1.2.840.113549.1.7.3").dump(),
        _ber_indefinite(0xA0, enveloped),
    )
