"""The X.509 extension that carries an attestation document inside an attested-TLS certificate.

OID choice: ``2.25.235260286923429261441635229802985584374.1``.

* ``2.25`` is the ITU-T X.667 / ISO 9834-8 arc of UUID-derived OIDs: anyone may mint an OID
  from a random UUID (here ``b0fd7bae-7ac3-4359-8742-bbb5ff1676f6``) without registration, and
  collisions are as unlikely as UUID collisions. It is a *private* arc that needs no IANA Private
  Enterprise Number (enclavekit has none) and, unlike squatting an unassigned arc (Edgeless aTLS
  uses ``1.3.9900``), cannot clash with anyone else's assignment.
* ``.1`` under that arc means "AWS Nitro attestation document, raw COSE_Sign1"; further sub-arcs
  are free for later formats (e.g. NitroTPM).

Encoding: ``extnValue`` holds the DER encoding of an ``OCTET STRING`` whose contents are the
attestation document exactly as the NSM returned it (untagged or tag-18 COSE_Sign1). The extension
is marked **non-critical**, so ordinary TLS clients (curl, browsers, requests) ignore it.

Decoding only unwraps the OCTET STRING and enforces a size limit; it does not verify the document.
"""

from __future__ import annotations

from asn1crypto import core
from cryptography import x509

from enclavekit.errors import MalformedInput

#: The UUID under ITU-T X.667 (see module docstring).
ENCLAVEKIT_UUID_ARC = "2.25.235260286923429261441635229802985584374"
#: The attestation-document extension OID.
ATTESTATION_EXTENSION_OID = x509.ObjectIdentifier(ENCLAVEKIT_UUID_ARC + ".1")
#: Nitro documents are a few KiB; 64 KiB bounds what a certificate parser must hold for us.
MAX_DOCUMENT_SIZE = 64 * 1024


def encode_extension_value(document: bytes) -> bytes:
    """The DER ``extnValue`` contents for ``document``."""
    if not document:
        raise ValueError("attestation document is empty")
    if len(document) > MAX_DOCUMENT_SIZE:
        raise ValueError(
            f"attestation document is {len(document)} bytes; limit {MAX_DOCUMENT_SIZE}"
        )
    return bytes(core.OctetString(document).dump())


def attestation_extension(document: bytes) -> x509.UnrecognizedExtension:
    """The extension object to add (non-critical) to a certificate builder."""
    return x509.UnrecognizedExtension(ATTESTATION_EXTENSION_OID, encode_extension_value(document))


def decode_extension_value(value: bytes) -> bytes:
    """The attestation document inside an ``extnValue``; raises :class:`MalformedInput`.

    Strict DER: tag 0x04 (primitive OCTET STRING), minimal definite length, no trailing bytes.
    """
    what = "attestation extension"
    if len(value) < 2 or value[0] != 0x04:
        raise MalformedInput(f"{what}: expected a DER OCTET STRING (tag 0x04)")
    first = value[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 3 or len(value) < 2 + count:
            raise MalformedInput(f"{what}: unsupported or truncated length (0x{first:02x})")
        length = int.from_bytes(value[2 : 2 + count], "big")
        offset = 2 + count
        if length < 0x80 or length.bit_length() > 8 * (count - 1) + 8 or value[2] == 0:
            raise MalformedInput(f"{what}: non-minimal length encoding (BER, not DER)")
    if length > MAX_DOCUMENT_SIZE:
        raise MalformedInput(
            f"{what}: document is {length} bytes; expected at most {MAX_DOCUMENT_SIZE}"
        )
    if len(value) != offset + length:
        raise MalformedInput(
            f"{what}: length says {length} bytes, found {len(value) - offset}"
            " (truncated or trailing data)"
        )
    if length == 0:
        raise MalformedInput(f"{what}: expected a non-empty document")
    return bytes(value[offset:])


def has_attestation_extension(certificate: x509.Certificate) -> bool:
    """Whether ``certificate`` carries the extension at all (decided on the parsed OID)."""
    return any(ext.oid == ATTESTATION_EXTENSION_OID for ext in certificate.extensions)


def document_from_certificate(certificate: x509.Certificate) -> bytes:
    """The embedded attestation document; raises :class:`MalformedInput` if absent or malformed."""
    try:
        ext = certificate.extensions.get_extension_for_oid(ATTESTATION_EXTENSION_OID)
    except x509.ExtensionNotFound as exc:
        raise MalformedInput(
            "certificate has no attestation extension"
            f" (OID {ATTESTATION_EXTENSION_OID.dotted_string});"
            " expected a certificate issued by an enclavekit attestation CA"
        ) from exc
    if ext.critical:
        raise MalformedInput("attestation extension is marked critical; expected non-critical")
    value = ext.value
    if not isinstance(
        value, x509.UnrecognizedExtension
    ):  # pragma: no cover - cryptography knows no such OID
        raise MalformedInput("attestation extension has an unexpected type")
    return decode_extension_value(value.value)
