"""CMS EnvelopedData as KMS returns it in ``CiphertextForRecipient``: decode, match, decrypt, encode.

Decoding (:meth:`Envelope.from_ber`) accepts BER (indefinite lengths, chunked content, as KMS sends) and
DER (as ``openssl cms -encrypt`` writes), and enforces, with one :class:`MalformedInput` per defect:

1. a ContentInfo of type envelopedData, nothing after it, at most :data:`MAX_ENVELOPE_SIZE` bytes;
2. EnvelopedData version 0 or 2 (RFC 5652 §6.1), no originatorInfo certificates needed;
3. key-transport recipients (KeyTransRecipientInfo) whose version agrees with the identifier form —
   0 with issuerAndSerialNumber, 2 with subjectKeyIdentifier; other recipient kinds are kept but unused;
4. key encryption RSAES-OAEP with SHA-256, MGF1-SHA-256 and an empty label (``RSAES_OAEP_SHA_256``);
5. content type id-data, content encryption AES-256-CBC with a 16-byte IV, ciphertext present and a
   whole number of blocks.

Decrypting (:meth:`Envelope.decrypt`) picks the recipient meant for the private key — subjectKeyIdentifier
equal to SHA-256 of the DER SubjectPublicKeyInfo (KMS), the RFC 5280 SHA-1 key id, or the certificate's
SKI extension / issuer and serial when a certificate is given — and falls back to trial decryption
(OAEP's integrity check tells a wrong key) for recipients that cannot be matched by identifier. A key
that opens no recipient raises :class:`NotForThisKey` (exit 1).

Not checked: anything about the sender — EnvelopedData is not signed, so the envelope proves nothing about
who made it; AES-CBC has no integrity tag (a tampered ciphertext decrypts to garbage or a padding error).
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
        self, private_key: rsa.RSAPrivateKey, *, certificate: x509.Certificate | None = None
    ) -> bytes:
        """Unwrap the content key with ``private_key`` and return the decrypted content."""
        cek = self._unwrap_key(private_key, certificate)
        decryptor = Cipher(algorithms.AES(cek), modes.CBC(self.iv)).decryptor()
        padded = decryptor.update(self.encrypted_content) + decryptor.finalize()
        unpadder = padding.PKCS7(AES_BLOCK * 8).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise MalformedInput(
                "CMS envelope content does not decrypt: invalid PKCS#7 padding after AES-256-CBC "
                "(the ciphertext or IV was altered, or the content key is wrong)"
            ) from None

    def _unwrap_key(
        self, private_key: rsa.RSAPrivateKey, certificate: x509.Certificate | None
    ) -> bytes:
        ids = key_identifiers(private_key.public_key(), certificate)
        matched = [r for r in self.recipients if _matches(r, ids, certificate)]
        others = [r for r in self.recipients if r not in matched]
        oaep = _oaep()
        for recipient in matched + others:
            try:
                cek = private_key.decrypt(recipient.encrypted_key, oaep)
            except ValueError:
                continue
            if len(cek) != CEK_SIZE:
                raise MalformedInput(
                    f"CMS envelope content key is {len(cek)} bytes; AES-256 needs {CEK_SIZE}"
                )
            return cek
        found = ", ".join(r.describe() for r in self.recipients) or "no key-transport recipient"
        if self.other_recipients:
            found += f" (+{self.other_recipients} recipient(s) of unsupported kinds)"
        raise NotForThisKey(
            "the envelope is not addressed to this key: expected a recipient with "
            f"subjectKeyIdentifier {ids[0].hex()} (SHA-256 of the key's SubjectPublicKeyInfo) "
            f"or one that this key can decrypt, found {found}; use the private key whose public "
            "key was in the attestation document's public_key"
        )


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
    # 5. Encrypted content.
    eci = enveloped["encrypted_content_info"]
    inner_type = eci["content_type"].dotted
    _require(
        inner_type == "1.2.840.113549.1.7.1",
        f"expected encrypted content type data (1.2.840.113549.1.7.1), found {inner_type}",
    )
    algorithm = eci["content_encryption_algorithm"]
    algo_oid = algorithm["algorithm"].dotted
    _require(
        algo_oid == "2.16.840.1.101.3.4.1.42",
        f"expected content encryption aes256-CBC (2.16.840.1.101.3.4.1.42), found {algo_oid}",
    )
    iv = algorithm["parameters"].native
    _require(
        isinstance(iv, bytes) and len(iv) == AES_BLOCK,
        f"expected a {AES_BLOCK}-byte AES-CBC IV, found {_describe(iv)}",
    )
    encrypted = eci["encrypted_content"]
    _require(encrypted.native is not None, "encrypted content is missing (detached content)")
    ciphertext = bytes(encrypted.native)
    _require(
        len(ciphertext) > 0 and len(ciphertext) % AES_BLOCK == 0,
        f"expected AES-CBC ciphertext of a positive multiple of {AES_BLOCK} bytes, "
        f"found {len(ciphertext)} bytes",
    )
    # unprotectedAttrs are allowed and ignored; touch them so lazily-parsed garbage is reported.
    _ = enveloped["unprotected_attrs"].native
    _ = enveloped["originator_info"].native
    return Envelope(version, tuple(recipients), others, iv, ciphertext)


def _version(native: object) -> int:
    """asn1crypto maps known CMS versions to ``"v0"``..``"v5"`` and leaves others as ints."""
    if isinstance(native, str) and native.startswith("v") and native[1:].isdigit():
        return int(native[1:])
    if isinstance(native, int):
        return native
    raise MalformedInput(f"CMS envelope: version is not an integer ({native!r})")


def _describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__


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
