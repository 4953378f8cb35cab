"""nitro-cli's ``describe-eif`` JSON (spec ``eif.md`` §5.2), field for field.

Order: ``EifVersion``, the ``Measurements`` object, ``IsSigned``, ``SigningCertificate`` (signed
only), ``CheckCRC``, ``SignatureCheck`` (signed only), ``ImageName``, ``ImageVersion`` and
``Metadata`` (only with a metadata section). ``Metadata`` holds the five build fields,
``DockerInfo`` and then the keys of the custom metadata object flattened in (serde ``flatten``),
nested objects with sorted keys.

Not reproduced: a custom-metadata key equal to one of the fixed ``Metadata`` keys (serde_json would
print the key twice; here the fixed field wins), Rust's escaping of grapheme-extending characters in
issuer names.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier, SignatureAlgorithmOID

from enclavekit.eif.measure import HASH_ALGORITHM_SHA384
from enclavekit.eif.metadata import sorted_json
from enclavekit.eif.reader import Eif, EifReport
from enclavekit.errors import EifError

#: OpenSSL long names (``OBJ_nid2ln``) of name attributes, as nitro-cli prints IssuerName keys.
_NAME_LONG_NAMES: dict[ObjectIdentifier, str] = {
    NameOID.COMMON_NAME: "commonName",
    NameOID.COUNTRY_NAME: "countryName",
    NameOID.LOCALITY_NAME: "localityName",
    NameOID.STATE_OR_PROVINCE_NAME: "stateOrProvinceName",
    NameOID.STREET_ADDRESS: "streetAddress",
    NameOID.ORGANIZATION_NAME: "organizationName",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "surname",
    NameOID.GIVEN_NAME: "givenName",
    NameOID.TITLE: "title",
    NameOID.INITIALS: "initials",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.X500_UNIQUE_IDENTIFIER: "x500UniqueIdentifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.USER_ID: "userId",
    NameOID.DOMAIN_COMPONENT: "domainComponent",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionCountryName",
    NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionLocalityName",
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionStateOrProvinceName",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.POSTAL_ADDRESS: "postalAddress",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
}

#: OpenSSL long names of certificate signature algorithms.
_SIGNATURE_LONG_NAMES: dict[ObjectIdentifier, str] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ecdsa-with-SHA1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA224: "ecdsa-with-SHA224",
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA224: "sha224WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384WithRSAEncryption",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "sha512WithRSAEncryption",
    SignatureAlgorithmOID.RSASSA_PSS: "rsassaPss",
    SignatureAlgorithmOID.ED25519: "ED25519",
    SignatureAlgorithmOID.ED448: "ED448",
    SignatureAlgorithmOID.DSA_WITH_SHA256: "dsa_with_SHA256",
}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _rust_debug_without_quotes(value: str) -> str:
    """Rust's ``{:?}`` of a string with every ``"`` then removed (how nitro-cli prints issuer
    values)."""
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append("\\")  # Rust writes \" and nitro-cli strips the quote
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\0":
            out.append("\\0")
        elif code < 0x20 or 0x7F <= code < 0xA0 or not ch.isprintable():
            out.append(f"\\u{{{code:x}}}")
        else:
            out.append(ch)
    return "".join(out)


def issuer_name_map(cert: x509.Certificate) -> dict[str, str]:
    """IssuerName: OpenSSL long name → value; repeated attributes keep the last; keys sorted."""
    out: dict[str, str] = {}
    for attribute in cert.issuer:
        key = _NAME_LONG_NAMES.get(attribute.oid, attribute.oid.dotted_string)
        raw = attribute.value
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        out[key] = _rust_debug_without_quotes(text)
    return dict(sorted(out.items()))


def asn1_time_print(cert: x509.Certificate, which: str) -> str:
    """OpenSSL ``ASN1_TIME_print``: ``Jun 18 21:04:00 2024 GMT`` (day padded with a space)."""
    moment = cert.not_valid_before_utc if which == "before" else cert.not_valid_after_utc
    return (
        f"{_MONTHS[moment.month - 1]} {moment.day:2d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {moment.year} GMT"
    )


def signing_certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """The ``SigningCertificate`` object of describe-eif."""
    oid = cert.signature_algorithm_oid
    return {
        "IssuerName": issuer_name_map(cert),
        "Algorithm": _SIGNATURE_LONG_NAMES.get(oid, oid.dotted_string),
        "NotBefore": asn1_time_print(cert, "before"),
        "NotAfter": asn1_time_print(cert, "after"),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


def describe_report(report: EifReport) -> dict[str, Any]:
    """Build describe-eif's JSON object from a verification report."""
    out: dict[str, Any] = {"EifVersion": report.header.version}
    out["Measurements"] = report.measurements.to_json()
    out["IsSigned"] = report.signature is not None
    if report.signature is not None:
        out["SigningCertificate"] = signing_certificate_info(report.signature.certificate)
    out["CheckCRC"] = report.crc_ok
    if report.signature is not None:
        out["SignatureCheck"] = report.signature.signature_check
    if report.metadata is not None:
        meta = report.metadata
        out["ImageName"] = meta.image_name
        out["ImageVersion"] = meta.image_version
        described: dict[str, Any] = dict(meta.build_info.to_json())
        described["DockerInfo"] = sorted_json(meta.docker_info)
        custom = meta.custom_metadata
        if custom is not None:
            if not isinstance(custom, dict):
                raise EifError(
                    "EIF metadata: CustomMetadata must be a JSON object or null to be described "
                    f"(nitro-cli flattens it), found {type(custom).__name__}"
                )
            for key, value in sorted_json(custom).items():
                described.setdefault(key, value)
        out["Metadata"] = described
    return out


def describe_eif(
    path: str | os.PathLike[str], *, hash_algorithm: str = HASH_ALGORITHM_SHA384
) -> dict[str, Any]:
    """nitro-cli's describe-eif JSON for the EIF at ``path``.

    A CRC mismatch or a signature over another PCR0 appear as ``false`` fields, as in nitro-cli;
    layout damage, an invalid signature or unreadable metadata raise :class:`EifError` subclasses.
    """
    return describe_with_report(path, hash_algorithm=hash_algorithm)[0]


def describe_with_report(
    path: str | os.PathLike[str], *, hash_algorithm: str = HASH_ALGORITHM_SHA384
) -> tuple[dict[str, Any], EifReport]:
    """describe-eif JSON and the underlying report (for callers that also need ``problems()``)."""
    with Eif.open(path) as eif:
        report = eif.verify(hash_algorithm=hash_algorithm)
    return describe_report(report), report
